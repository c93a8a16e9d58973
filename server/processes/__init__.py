"""More than one process behind one port (`--frontends N`): the supervisor (supervisor.py)
starts an engine process (engine_process.py: the manager, batchers, sessions) and N front-end
processes (frontend_process.py: gRPC, HTTP, validation, tokenization), which talk over a Unix
socket (link.py frames, messages.py the typed messages); procmetrics.py merges their /metrics.

May import: pipeline, repository, engine and the root modules; not api (a front-end process's
servicers are composed in app.py), which in turn never imports processes.
"""
