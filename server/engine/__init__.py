"""Token ids in, vectors out: the version's tokenizer (tokenizer.py) and the arrays it makes
(batch.py), the batcher (batcher.py) running the scheduler's choices (scheduler.py) under the
cost model (costmodel.py) on worker threads (workers.py), and the loader (loader.py) that builds
all of it for one version folder behind the `Loader` protocol (interface.py).

backends/ holds one module per engine behind the `Backend` protocol (backends/base.py):
onnxruntime, OpenVINO and the fake device; backends import only engine.batch, engine.costmodel
and the root modules.

May import: the root modules only.
"""
