"""The model manager: which versions serve, swaps, drains, and leases on a version.

Contract:
- Everything here runs on the event loop. Blocking work (session creation, memory trimming)
  runs on worker threads inside the `Loader`; the manager only awaits it.
- The manager owns one `ModelState` per model (versions.py); only a holder of that model's
  `lock` changes it, so a slow load of model A never delays work on model B.
- Every state change goes through `ModelVersion.transition` (the `TRANSITIONS` table).
- Which versions to load, retire or leave waiting is decided by planner.py (pure); this module
  looks at the disk, applies the decisions and publishes a new `RepositorySnapshot` right after
  every change, before it next awaits, so the snapshot always agrees with what `resolve` routes.
- `lease()` hands a READY version to one request; a retired version's session is released when
  its last lease ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from ..engine.interface import Loader
from ..errors import LoadFailed, ModelNotFound, ModelNotReady
from ..metrics import Metrics
from ..version_format import CONFIG_FILE
from . import folders, watcher
from .planner import Disk, plan, reload_failures, reload_todo, settle
from .routing import Router
from .snapshot import build_snapshot
from .versions import ConfigState, ModelState, ModelVersion, State

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)

Stable = Callable[[Path], bool]


class ModelManager(Router):
    """All models of one repository, the versions of each, and how they change.

    `sync(scan)` is the one place versions are loaded and retired, whatever asked for it
    (start-up, the poll loop, LoadModel, UnloadModel), so every mode shares the swap rules:
    - new versions load and warm up beside the serving ones; routing switches when they are
      READY (`resolve` only ever returns READY versions, and a dict update is atomic on the
      event loop);
    - a retired version turns UNLOADING at once (no new requests), and its session is released
      when its last lease ends;
    - a version that fails to load is skipped when the policy picks the versions to serve, so a
      broken new version never takes the place of a good one; it is retried when its folder
      changes;
    - a config.pbtxt change reloads every served version with the new config beside the old
      ones, and switches only if all of them load.
    """

    def __init__(self, root: Path, loader: Loader, default_model: str = "",
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(default_model)
        self.root = root
        self.loader = loader
        self.metrics = metrics
        self._draining: set[asyncio.Task[None]] = set()
        self._closing = False  # set by close(): syncs load nothing more
        self._on_change = on_change

    async def load_all(self) -> None:
        """Load what the version policy of every model serves (start-up of modes none, poll)."""
        await self.sync(await asyncio.to_thread(folders.scan, self.root))

    async def load_model(self, name: str) -> ModelVersion:
        """Explicit mode: (re)read one model from disk and serve its policy's versions.
        Raises LoadFailed when the model's config cannot be applied or no version serves;
        versions skipped because they fail are reported in the version rows instead."""
        entry = await asyncio.to_thread(folders.scan_model, self.root, name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} has no folder in the repository")
        # Shielded: a caller that gives up must not leave a sync half done.
        await asyncio.shield(self.sync({name: entry}, only={name}))
        ms = self.models.get(name)
        if ms is not None and ms.error:  # config.pbtxt broken or not applied: say so
            raise LoadFailed(f"model {name!r}: {ms.error}")
        try:
            return self.resolve(name, 0)
        except ModelNotReady as exc:
            raise LoadFailed(str(exc)) from None

    async def unload_model(self, name: str) -> None:
        """Explicit mode: stop serving every version of a model (running requests finish)."""
        folders.check_name(name)
        await asyncio.shield(self._unload(name))

    async def _unload(self, name: str) -> None:
        ms = self.models.get(name)
        if ms is None or ms.removed:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with ms.lock:
            for mv in ms.ready():
                self._retire(mv, "unloaded by UnloadModel")
            ms.config = ms.config.unloaded()
            self._publish()
        await self._changed()

    async def sync(self, entries: Mapping[str, folders.ModelEntry],
                   stable: Stable | None = None, only: set[str] | None = None) -> None:
        """Bring the served versions in line with a scan. `stable` says whether a version
        folder has stopped changing (poll mode); None loads what is there. `only` limits the
        sync to some models; without it, models missing from `entries` are removed. Models
        sync side by side, each under its own lock."""
        known = {name for name, ms in self.models.items() if not ms.removed}
        names = set(only) if only is not None else set(entries) | known
        results = await asyncio.gather(*(self._sync_one(name, entries.get(name), stable)
                                         for name in sorted(names)), return_exceptions=True)
        await self._changed()  # health follows the models that did sync
        for result in results:  # then the first failure, once every model had its turn
            if isinstance(result, BaseException):
                raise result

    async def _sync_one(self, name: str, entry: folders.ModelEntry | None,
                        stable: Stable | None) -> None:
        ms = self.models.get(name)
        if entry is None:
            if ms is not None:
                async with ms.lock:
                    self._remove_model(ms)
                    self._publish()
            return
        if ms is None:
            ms = self.models[name] = ModelState(name)
        async with ms.lock:
            if self._closing:  # the server is stopping: nothing new loads
                return
            await self._sync_model(ms, entry, stable)
            self._publish()

    async def _sync_model(self, ms: ModelState, entry: folders.ModelEntry,
                          stable: Stable | None) -> None:
        serving = [mv.version for mv in ms.ready()]
        if entry.config is None:
            still = f"; still serving versions {serving} with the previous config"
            ms.config = ms.config.unreadable(f"{entry.config_error}{still if serving else ''}")
            return
        digest = entry.config_digest
        if serving and (ms.config.digest or digest) != digest:
            # A config change that failed is tried again when the config or a folder changes.
            attempt = (digest, _folders(entry))
            if ms.config.failed_reload != attempt:
                await self._reload(ms, entry, stable, attempt)
            return
        ms.config = ConfigState(ms.config.digest)  # this config, so far without an error
        on_disk = set(entry.versions)
        tried: set[int] = set()
        while True:
            step = plan(entry.config.version_policy, on_disk, _states(ms),
                        self._look(ms, entry, stable), tried)
            for version, why in step.waiting.items():
                ms.versions[version] = ModelVersion(entry.name, version, entry.versions[version],
                                                    reason=why)
            self._publish()
            if not step.load:
                break
            for version in step.load:
                tried.add(version)
                ms.versions[version] = mv = await self._load_version(entry, version)
                self._watch(mv)
                self._publish()
        done = settle(step.wanted, on_disk, _states(ms))
        for version, why in done.retire.items():
            self._retire(ms.versions[version], why)
        for version in done.forget:
            del ms.versions[version]
        ms.config = ConfigState(digest if ms.ready() else ms.config.digest, done.error)

    def _look(self, ms: ModelState, entry: folders.ModelEntry,
              stable: Stable | None) -> dict[int, Disk]:
        """What the disk says about each version folder that is not READY or LOADING: a
        failure unchanged since, then missing files, then (poll mode) stability."""
        assert entry.config is not None
        looks = {}
        for version, path in entry.versions.items():
            mv = ms.versions.get(version)
            if mv is not None and mv.state in (State.READY, State.LOADING):
                continue
            if _failed_unchanged(mv, path, entry.config_digest):
                looks[version] = Disk(failed_unchanged=True)
                continue
            missing = tuple(watcher.missing_files(path, entry.config))
            still = not missing and stable is not None and not stable(path)
            looks[version] = Disk(missing=missing, stable=not still)
        return looks

    async def _load_version(self, entry: folders.ModelEntry, version: int) -> ModelVersion:
        """Build and warm up one version; READY, or UNAVAILABLE with the reason."""
        assert entry.config is not None
        path = entry.versions[version]
        mv = ModelVersion(entry.name, version, path, config_digest=entry.config_digest)
        before = watcher.fingerprint(path)  # taken first: a change during the load retries
        mv.transition(State.LOADING)
        try:
            outside = await asyncio.to_thread(folders.links_outside, self.root, path)
            if outside:  # the loader reads only what this repository holds
                raise ValueError(f"refused: {', '.join(outside)} links outside the model "
                                 "repository (symlinks must stay inside it)")
            mv.loaded = await self.loader.build(entry.name, version, path, entry.config)
            await self.loader.warm_up(mv.loaded)
        except asyncio.CancelledError:  # the server is stopping: leave nothing running
            await self._close(mv)
            raise
        except Exception as exc:
            await self._close(mv)
            mv.failed = before
            mv.transition(State.UNAVAILABLE, f"load failed: {exc}")
            log.error("model %s version %d: load failed: %s", entry.name, version, exc)
            if self.metrics is not None:
                self.metrics.load_failures.labels(entry.name).inc()
            return mv
        mv.transition(State.READY)
        return mv

    def _watch(self, mv: ModelVersion) -> None:
        """The queue and device gauges of a version that just became routable. Not before: a
        reload that fails must not leave the gauges (and so its session) to a version that
        never served, nor take them from the one that still does."""
        if self.metrics is not None and mv.loaded is not None and mv.state is State.READY:
            batcher = mv.loaded.batcher
            self.metrics.watch_queue(mv.model, mv.version, lambda: batcher.queued)
            self.metrics.watch_device(mv.model, mv.version, mv.loaded.busy_seconds)
            levels = int(mv.loaded.config.dynamic_batching.priority_levels)
            self.metrics.watch_levels(mv.model, mv.version, levels, batcher.queued_at)
            if mv.loaded.cost is not None:
                self.metrics.show_cost(mv.model, mv.version, mv.loaded.cost)

    async def _reload(self, ms: ModelState, entry: folders.ModelEntry,
                      stable: Stable | None, attempt: tuple[str, tuple[object, ...]]) -> None:
        """config.pbtxt changed: load the new policy's versions with it beside the serving
        ones. All or nothing: every serving version the new policy keeps must load (new
        versions that fail are skipped, as in a sync); otherwise the old config keeps serving."""
        assert entry.config is not None
        old_ready = {mv.version: mv for mv in ms.ready()}
        looks = self._look(ms, entry, stable)
        usable = [v for v in sorted(entry.versions)
                  if v in old_ready or (v in looks and looks[v].loadable)]
        fresh: dict[int, ModelVersion] = {}
        try:
            while todo := reload_todo(entry.config.version_policy, usable,
                                      {v: mv.state for v, mv in fresh.items()}):
                for version in todo:
                    fresh[version] = await self._load_version(entry, version)
        except asyncio.CancelledError:  # stopping mid-reload: the new sessions never served
            for mv in fresh.values():
                await self._close(mv)
            raise
        failure = reload_failures(set(old_ready),
                                  {v: (mv.state, mv.reason) for v, mv in fresh.items()})
        if failure:
            for mv in fresh.values():
                await self._close(mv)
            ms.config = ms.config.reload_failed(attempt, failure)
            return
        ms.versions.update(fresh)  # the switch: one dict update on the event loop
        for mv in old_ready.values():
            self._retire(mv, f"{CONFIG_FILE} changed")
        for mv in fresh.values():
            self._watch(mv)
        ms.config = ConfigState(entry.config_digest)

    def _remove_model(self, ms: ModelState) -> None:
        for mv in ms.ready():
            self._retire(mv, "its model folder was removed from the repository")
        ms.versions, ms.config = {}, ConfigState(removed=True)

    def _retire(self, mv: ModelVersion, why: str) -> None:
        """No new requests from now on; the session goes when the last lease ends."""
        mv.transition(State.UNLOADING, why)
        task = asyncio.get_running_loop().create_task(self._drain(mv, why))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, mv: ModelVersion, why: str) -> None:
        await mv.idle()
        loaded, mv.loaded = mv.loaded, None
        if loaded is not None:
            await self.loader.release(loaded, trim=True)
        ms = self.models.get(mv.model)
        current = ms.versions.get(mv.version) if ms is not None else None
        if self.metrics is not None and (current is None or current.state is not State.READY):
            self.metrics.forget(mv.model, mv.version)  # unless a reload put a new one there
        mv.transition(State.UNAVAILABLE, f"unloaded: {why}")
        self._publish()
        await self._changed()

    async def _close(self, mv: ModelVersion) -> None:
        """Drop a failed or abandoned load's session (no lease ever saw it)."""
        loaded, mv.loaded = mv.loaded, None
        if loaded is not None:
            await self.loader.release(loaded, trim=False)

    def _publish(self) -> None:
        self.snapshot = build_snapshot(list(self.models.values()), self.default_model())

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def close(self) -> None:
        """Retire everything and wait until every session is released. From here on a sync
        loads nothing: a LoadModel queued behind a model's lock, or a model that appeared
        during the close, must not bring a session back after its model was retired."""
        self._closing = True
        while True:
            for ms in list(self.models.values()):
                async with ms.lock:
                    for mv in ms.ready():
                        self._retire(mv, "server stopped")
                    self._publish()
            if not any(ms.ready() for ms in self.models.values()):
                break
        await self.drained()

    async def drained(self) -> None:
        """Wait until every retired version has released its session."""
        while self._draining:
            await asyncio.gather(*list(self._draining))


def _states(ms: ModelState) -> dict[int, State]:
    return {v: mv.state for v, mv in ms.versions.items()}


def _failed_unchanged(mv: ModelVersion | None, path: Path, digest: str) -> bool:
    """A version whose load failed, with the same folder and config: do not try again."""
    return (mv is not None and mv.failed is not None and mv.config_digest == digest
            and mv.failed == watcher.fingerprint(path))


def _folders(entry: folders.ModelEntry) -> tuple[object, ...]:
    return tuple(sorted((v, watcher.fingerprint(p)) for v, p in entry.versions.items()))
