"""The control plane: the model repository on disk (folders.py, config.py, watcher.py), what to
load when it changes (planner.py), each version's state machine (versions.py), the manager that
loads, swaps and retires versions (manager.py), what callers see of it (snapshot.py), routing and
leases (routing.py), poll and explicit control (control.py), and the models interface every
front end programs against (models.py).

May import: the engine's `interface` (Loader, Loaded) and what a Loaded version holds, the root
modules. Never api, pipeline or processes.
"""
