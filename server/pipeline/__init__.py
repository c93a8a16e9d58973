"""A request's path through one front end: validate the texts (validation.py), resolve the model
and lease a version, tokenize on the worker threads, pick the outputs, submit the work items to
the version's batcher and gather the rows back in order (inference.py).

May import: repository (the models interface), engine (work items, the tokenizer), the root
modules.
"""
