"""The control plane's loops: what loads at start, and poll mode's rescans.

Run by the one process that owns the models: the single server process, or the engine when
front ends are split off (`--frontends N`). In explicit mode the engine also remembers which
models LoadModel / UnloadModel left loaded (`ExplicitMemory`), so an engine restarted after a
crash serves what it served before, not only the `--load-model` list.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from ..errors import BertstreamError
from . import folders
from .manager import ModelManager
from .watcher import StabilityTracker

__all__ = ["ExplicitMemory", "initial_load", "poll"]

log = logging.getLogger("bertstream.server")


class ExplicitMemory:
    """The models explicitly loaded, in a file of the run folder (atomic replace)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> tuple[str, ...] | None:
        """The remembered models, or None when nothing was remembered yet."""
        if self.path is None:
            return None
        try:
            names = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return tuple(str(n) for n in names) if isinstance(names, list) else None

    def write(self, manager: ModelManager) -> None:
        if self.path is None:
            return
        names = sorted(name for name, ms in manager.models.items() if ms.ready())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(names), "utf-8")
        os.replace(tmp, self.path)


async def initial_load(manager: ModelManager, control_mode: str,
                       load_models: tuple[str, ...], root: Path) -> None:
    if control_mode != "explicit":
        await manager.load_all()
        return
    names = load_models
    if "*" in names:
        names = tuple(folders.scan(root))
    for name in names:
        try:
            await manager.load_model(name)
        except BertstreamError as exc:  # the server starts anyway; ListModels says why
            log.error("--load-model %s: %s", name, exc)


async def poll(manager: ModelManager, root: Path, every_s: float) -> None:
    """Poll mode: rescan every --repository-poll-secs and let the manager follow the folder.
    A scan that fails (the repository is being moved, say) is logged and retried."""
    tracker = StabilityTracker(quiet_s=every_s)
    while True:
        await asyncio.sleep(every_s)
        try:
            entries = await asyncio.to_thread(folders.scan, root)
            await manager.sync(entries, stable=tracker.stable)
            tracker.forget({path for e in entries.values() for path in e.versions.values()})
        except Exception:
            log.exception("repository poll failed; trying again in %.1fs", every_s)
