"""Model versions: their states, loading, and leases that keep a version alive while used.

Contract:
- Every state change goes through `ModelVersion.transition`, checked against `TRANSITIONS`
  (Triton's state names, so the repository index reads like Triton's).
- A load is all-or-nothing: session(s), tokenizer, labels and a warm-up request must all
  succeed before the version turns READY and becomes routable.
- `lease()` hands a READY version to one request; unloading waits for leases to reach zero.
- All methods run on the event loop; blocking work (session creation) runs on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import gc
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bertstream.v1.model_config_pb2 import ModelConfig, Task

from . import repository, watcher
from .batcher import Batcher, BatcherOptions, WorkItem
from .errors import LoadFailed, ModelNotFound, ModelNotReady
from .fakedevice import FakeDevicePool, parse_spec
from .metrics import Metrics
from .runtime import RuntimeOptions, RuntimePool
from .tokenization import Encoded, TextTokenizer
from .version_format import (
    CONFIG_FILE,
    EXPORT_RECORD,
    LABELS_FILE,
    MODEL_FILE,
    POOLINGS,
    PROBABILITIES,
    RECORD_HEAD,
    RECORD_HEAD_ORIGIN,
    RECORD_SOURCE_KIND,
    TOKENIZER_FILE,
    layer_outputs,
    output_name,
    output_width,
)

__all__ = ["Loaded", "ModelManager", "ModelVersion", "State"]

log = logging.getLogger(__name__)


class State(enum.Enum):
    UNKNOWN = 0
    LOADING = 1
    READY = 2
    UNLOADING = 3
    UNAVAILABLE = 4


TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNKNOWN: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.UNAVAILABLE}),
    State.READY: frozenset({State.UNLOADING}),
    State.UNLOADING: frozenset({State.UNAVAILABLE}),
    State.UNAVAILABLE: frozenset({State.LOADING}),
}


@dataclass
class Loaded:
    """What a READY version serves with."""

    config: ModelConfig
    tokenizer: TextTokenizer
    batcher: Batcher
    labels: list[str]
    provider: str


@dataclass(eq=False)
class ModelVersion:
    model: str
    version: int
    path: Path
    state: State = State.UNKNOWN
    reason: str = ""
    loaded: Loaded | None = None
    leases: int = 0
    config_digest: str = ""  # of the config.pbtxt this version was loaded with
    failed: watcher.Fingerprint | None = None  # the folder as it was when its load failed
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.model}/{self.version}: {self.state.name} -> {new.name}")
        log.info("%s version %d: %s -> %s %s", self.model, self.version, self.state.name,
                 new.name, reason)
        self.state, self.reason = new, reason


def _check_outputs(config: ModelConfig, runtime: RuntimePool | FakeDevicePool) -> None:
    """The graph must offer what config.pbtxt promises, with the promised sizes."""
    dims = runtime.output_dims
    hidden = config.embedding_dimension
    for layer in config.pooling_layers:
        for pooling in POOLINGS:
            name = output_name(pooling, layer)
            if name not in dims:
                raise ValueError(f"{MODEL_FILE} has no output {name!r} that {CONFIG_FILE} "
                                 "implies")
            want = output_width(pooling, hidden)
            if dims[name][-1] not in (None, want):
                raise ValueError(
                    f"output {name!r} has size {dims[name][-1]}, {CONFIG_FILE} says {want}"
                )
    if config.task == Task.TASK_CLASSIFY:
        if PROBABILITIES not in dims:
            raise ValueError(f"a TASK_CLASSIFY {MODEL_FILE} needs a {PROBABILITIES!r} output")
        if dims[PROBABILITIES][-1] not in (None, config.num_labels):
            raise ValueError(
                f"the head has {dims[PROBABILITIES][-1]} classes, {CONFIG_FILE} says "
                f"{config.num_labels}"
            )


def _read_labels(path: Path, config: ModelConfig) -> list[str]:
    if config.task != Task.TASK_CLASSIFY:
        return []
    labels_file = path / LABELS_FILE
    if not labels_file.is_file():
        raise ValueError(f"{LABELS_FILE} is missing")
    labels = [line.strip() for line in labels_file.read_text("utf-8").splitlines() if line.strip()]
    if len(labels) != config.num_labels:
        raise ValueError(f"{LABELS_FILE} has {len(labels)} labels, {CONFIG_FILE} says "
                         f"{config.num_labels}")
    return labels


def _build(
    path: Path, config: ModelConfig, options: RuntimeOptions, root: Path
) -> tuple[RuntimePool | FakeDevicePool, TextTokenizer, list[str]]:
    """Blocking part of a load: files, session, checks. Runs on a worker thread."""
    outside = repository.links_outside(root, path)
    if outside:
        raise ValueError(f"refused: {', '.join(outside)} links outside the model repository "
                         "(symlinks must stay inside it)")
    model_file = path / MODEL_FILE
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing")
    tokenizer = TextTokenizer(path / TOKENIZER_FILE, config.max_sequence_length)
    labels = _read_labels(path, config)
    try:
        instances = sum(group.count or 1 for group in config.instance_group)
        if options.fake_device:  # benchmarks: GPU timing without a GPU (fakedevice.py)
            runtime: RuntimePool | FakeDevicePool = FakeDevicePool(
                model_file, parse_spec(options.fake_device), instances, options.gpu_id)
        else:
            runtime = RuntimePool(model_file, options, instances)
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot load {MODEL_FILE}: {exc}") from None
    _check_outputs(config, runtime)
    _warn_if_untrained(path)
    return runtime, tokenizer, labels


def _warn_if_untrained(path: Path) -> None:
    """Say loudly when a version's weights are random-init (test and placeholder models)."""
    try:
        record = json.loads((path / EXPORT_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return
    head = record.get(RECORD_HEAD) or {}
    if record.get(RECORD_SOURCE_KIND) == "random":
        log.warning("%s: random-init encoder weights (export source 'random'): its vectors and "
                    "labels carry no meaning; export a real checkpoint for real use", path)
    elif str(head.get(RECORD_HEAD_ORIGIN, "")).startswith("random"):
        log.warning("%s: the classification head is random-init: its labels carry no meaning",
                    path)


class ModelManager:
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

    def __init__(self, root: Path, runtime_options: RuntimeOptions, default_model: str = "",
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.root = root
        self.metrics = metrics
        self.runtime_options = runtime_options
        self._default = default_model
        self.versions: dict[str, dict[int, ModelVersion]] = {}
        self.model_errors: dict[str, str] = {}
        self.removed: set[str] = set()  # models whose folder went away (health: NOT_SERVING)
        self._digests: dict[str, str] = {}  # config.pbtxt digest the serving versions use
        # A config change that did not load: (digest, folders) of that attempt.
        self._failed_reloads: dict[str, tuple[str, tuple[object, ...]]] = {}
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()
        self._on_change = on_change

    async def load_all(self) -> None:
        """Load what the version policy of every model serves (start-up of modes none, poll)."""
        await self.sync(await asyncio.to_thread(repository.scan, self.root))

    async def load_model(self, name: str) -> ModelVersion:
        """Explicit mode: (re)read one model from disk and serve its policy's versions.
        Raises LoadFailed when the model's config cannot be applied or no version serves;
        versions skipped because they fail are reported in the version rows instead."""
        entry = await asyncio.to_thread(repository.scan_model, self.root, name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} has no folder in the repository")
        # Shielded: a caller that gives up must not leave a sync half done.
        await asyncio.shield(self.sync({name: entry}, only={name}))
        if name in self.model_errors:  # config.pbtxt broken or not applied: say so
            raise LoadFailed(f"model {name!r}: {self.model_errors[name]}")
        try:
            return self.resolve(name, 0)
        except ModelNotReady as exc:
            raise LoadFailed(str(exc)) from None

    async def unload_model(self, name: str) -> None:
        """Explicit mode: stop serving every version of a model (running requests finish)."""
        repository.check_name(name)
        await asyncio.shield(self._unload(name))

    async def _unload(self, name: str) -> None:
        async with self._lock:
            versions = self.versions.get(name)
            if versions is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            for mv in versions.values():
                if mv.state is State.READY:
                    self._retire(mv, "unloaded by UnloadModel")
            self.model_errors[name] = "unloaded by UnloadModel"
        await self._changed()

    async def sync(self, entries: dict[str, repository.ModelEntry],
                   stable: Callable[[Path], bool] | None = None,
                   only: set[str] | None = None) -> None:
        """Bring the served versions in line with a scan. `stable` says whether a version
        folder has stopped changing (poll mode); None loads what is there. `only` limits the
        sync to some models; without it, models missing from `entries` are removed."""
        async with self._lock:
            names = set(only) if only is not None else set(entries) | set(self.versions)
            for name in sorted(names):
                entry = entries.get(name)
                if entry is None:
                    self._remove_model(name)
                else:
                    await self._sync_model(entry, stable)
        await self._changed()

    async def _sync_model(self, entry: repository.ModelEntry,
                          stable: Callable[[Path], bool] | None) -> None:
        name = entry.name
        self.removed.discard(name)
        versions = self.versions.setdefault(name, {})
        serving = sorted(v for v, mv in versions.items() if mv.state is State.READY)
        if entry.config is None:
            still = f"; still serving versions {serving} with the previous config"
            self.model_errors[name] = f"{entry.config_error}{still if serving else ''}"
            return
        digest = entry.config_digest
        if serving and self._digests.get(name, digest) != digest:
            # A config change that failed is tried again when the config or a folder changes.
            attempt = (digest, _folders(entry))
            if self._failed_reloads.get(name) != attempt:
                await self._reload(entry, stable, attempt)
            return
        self.model_errors.pop(name, None)
        self._failed_reloads.pop(name, None)
        tried: set[int] = set()
        while True:
            wanted = self._wanted(entry, stable)
            todo = [v for v in wanted if v not in tried
                    and (versions.get(v) is None or versions[v].state is not State.READY)]
            if not todo:
                break
            for version in todo:
                tried.add(version)
                versions[version] = await self._load_version(entry, version, digest)
        ready_wanted = [v for v in wanted if versions[v].state is State.READY]
        for version, mv in list(versions.items()):
            if mv.state is State.READY and version not in wanted:
                if ready_wanted or version not in entry.versions:
                    why = "removed from the repository" if version not in entry.versions else (
                        f"the version policy now serves {ready_wanted}")
                    self._retire(mv, why)
                else:
                    self.model_errors[name] = (
                        f"the version policy serves {wanted or 'no version'}, and none of them "
                        f"loads; still serving version {version}")
            elif mv.state is not State.READY and mv.state is not State.UNLOADING \
                    and version not in entry.versions:
                del versions[version]  # gone from disk and not serving: forget it
        if any(mv.state is State.READY for mv in versions.values()):
            self._digests[name] = digest

    def _wanted(self, entry: repository.ModelEntry,
                stable: Callable[[Path], bool] | None) -> list[int]:
        """The policy's versions among those that can serve: READY ones, and folders that are
        complete, stable, and not a failure whose folder and config are unchanged since."""
        assert entry.config is not None
        versions = self.versions.setdefault(entry.name, {})
        candidates = []
        for version, path in entry.versions.items():
            mv = versions.get(version)
            if mv is not None and mv.state in (State.READY, State.LOADING):
                candidates.append(version)
                continue
            if _failed_unchanged(mv, path, entry.config_digest):
                continue
            missing = watcher.missing_files(path, entry.config)
            if missing or (stable is not None and not stable(path)):
                if mv is None or mv.state is State.UNKNOWN:
                    waiting = f"{', '.join(missing)} missing" if missing else "still changing"
                    versions[version] = ModelVersion(
                        entry.name, version, path,
                        reason=f"waiting for the folder to be complete: {waiting}")
                continue
            candidates.append(version)
        return repository.select_versions(entry.config.version_policy, candidates)

    async def _load_version(self, entry: repository.ModelEntry, version: int,
                            digest: str) -> ModelVersion:
        assert entry.config is not None
        path = entry.versions[version]
        mv = ModelVersion(entry.name, version, path, config_digest=digest)
        before = watcher.fingerprint(path)  # taken first: a change during the load retries
        mv.transition(State.LOADING)
        try:
            runtime, tokenizer, labels = await asyncio.to_thread(
                _build, path, entry.config, self.runtime_options, self.root
            )
            observer = self.metrics.batch_observer(entry.name, version) if self.metrics else None
            options = dataclasses.replace(_batcher_options(entry.config),
                                          instances=runtime.concurrency)
            batcher = Batcher(runtime.run, options, observer)
            mv.loaded = Loaded(entry.config, tokenizer, batcher, labels, runtime.provider)
            await _warm_up(mv.loaded)
        except asyncio.CancelledError:  # the server is stopping: leave nothing running
            await _close(mv)
            raise
        except Exception as exc:
            await _close(mv)
            mv.failed = before
            mv.transition(State.UNAVAILABLE, f"load failed: {exc}")
            log.error("model %s version %d: load failed: %s", entry.name, version, exc)
            return mv
        mv.transition(State.READY)
        if self.metrics is not None:
            self.metrics.watch_queue(entry.name, version, lambda: batcher.queued)
            self.metrics.watch_device(entry.name, version, runtime.busy_seconds)
        return mv

    async def _reload(self, entry: repository.ModelEntry,
                      stable: Callable[[Path], bool] | None,
                      attempt: tuple[str, tuple[object, ...]]) -> None:
        """config.pbtxt changed: load the new policy's versions with it beside the serving
        ones. All or nothing: every serving version the new policy keeps must load (new
        versions that fail are skipped, as in a sync); otherwise the old config keeps serving."""
        name, versions, digest = entry.name, self.versions[entry.name], entry.config_digest
        assert entry.config is not None
        old_ready = {v: mv for v, mv in versions.items() if mv.state is State.READY}
        candidates = [
            v for v, path in entry.versions.items()
            if v in old_ready or (
                not _failed_unchanged(versions.get(v), path, digest)
                and not watcher.missing_files(path, entry.config)
                and (stable is None or stable(path)))
        ]
        fresh: dict[int, ModelVersion] = {}
        while todo := [v for v in repository.select_versions(
                           entry.config.version_policy,
                           [v for v in candidates if v not in fresh
                            or fresh[v].state is State.READY])
                       if v not in fresh]:
            for version in todo:
                fresh[version] = await self._load_version(entry, version, digest)
        ready = {v: mv for v, mv in fresh.items() if mv.state is State.READY}
        broken = {v: mv for v, mv in fresh.items() if v in old_ready and v not in ready}
        if broken or not ready:
            for mv in ready.values():
                await _close(mv)
            failures = "; ".join(f"version {v}: {mv.reason}" for v, mv in
                                 (broken or fresh).items())
            self._failed_reloads[name] = attempt
            self.model_errors[name] = (
                f"{CONFIG_FILE} changed but the served versions do not all load with it "
                f"({failures or 'no complete version'}); still serving the previous config")
            return
        versions.update(fresh)  # the switch: one dict update on the event loop
        for mv in old_ready.values():
            self._retire(mv, f"{CONFIG_FILE} changed")
        self._digests[name] = digest
        self._failed_reloads.pop(name, None)
        self.model_errors.pop(name, None)

    def _remove_model(self, name: str) -> None:
        for mv in self.versions.pop(name, {}).values():
            if mv.state is State.READY:
                self._retire(mv, "its model folder was removed from the repository")
        self.model_errors.pop(name, None)
        self._digests.pop(name, None)
        self.removed.add(name)

    def _retire(self, mv: ModelVersion, why: str) -> None:
        """No new requests from now on; the session goes when the last lease ends."""
        mv.transition(State.UNLOADING, why)
        task = asyncio.get_running_loop().create_task(self._drain(mv, why))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, mv: ModelVersion, why: str) -> None:
        if mv.leases:
            await mv._idle.wait()
        await _close(mv)
        await asyncio.to_thread(_release_memory)
        current = self.versions.get(mv.model, {}).get(mv.version)
        if self.metrics is not None and (current is None or current.state is not State.READY):
            self.metrics.forget(mv.model, mv.version)  # unless a reload put a new one there
        mv.transition(State.UNAVAILABLE, f"unloaded: {why}")
        await self._changed()

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    def default_model(self) -> str:
        if self._default:
            return self._default
        ready = sorted(m for m, vs in self.versions.items()
                       if any(v.state is State.READY for v in vs.values()))
        return ready[0] if ready else ""

    def resolve(self, model: str, version: int) -> ModelVersion:
        """The version a request names, or the highest READY one when it names none."""
        name = repository.check_name(model or self.default_model() or "<none>")
        versions = self.versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        if version:
            mv = versions.get(version)
            if mv is None:
                raise ModelNotFound(f"model {name!r} has no version {version} being served")
            if mv.state is not State.READY:
                raise ModelNotReady(f"model {name!r} version {version} is {mv.state.name}: "
                                    f"{mv.reason}")
            return mv
        ready = [mv for v, mv in sorted(versions.items()) if mv.state is State.READY]
        if not ready:
            why = self.model_errors.get(name) or "; ".join(
                f"version {mv.version} {mv.state.name}: {mv.reason}" for mv in versions.values()
            )
            raise ModelNotReady(f"model {name!r} has no ready version ({why})")
        return ready[-1]

    @contextlib.contextmanager
    def lease(self, model: str, version: int) -> Iterator[ModelVersion]:
        mv = self.resolve(model, version)
        mv.leases += 1
        mv._idle.clear()
        try:
            yield mv
        finally:
            mv.leases -= 1
            if mv.leases == 0:
                mv._idle.set()

    async def close(self) -> None:
        """Retire everything and wait until every session is released."""
        async with self._lock:
            for versions in self.versions.values():
                for mv in versions.values():
                    if mv.state is State.READY:
                        self._retire(mv, "server stopped")
        while self._draining:
            await asyncio.gather(*list(self._draining))


def _failed_unchanged(mv: ModelVersion | None, path: Path, digest: str) -> bool:
    """A version whose load failed, with the same folder and config: do not try again."""
    return (mv is not None and mv.failed is not None and mv.config_digest == digest
            and mv.failed == watcher.fingerprint(path))


def _folders(entry: repository.ModelEntry) -> tuple[object, ...]:
    return tuple(sorted((v, watcher.fingerprint(p)) for v, p in entry.versions.items()))


async def _close(mv: ModelVersion) -> None:
    """Stop a version's batcher and drop its session (retired, failed or abandoned load)."""
    loaded, mv.loaded = mv.loaded, None
    if loaded is not None:
        await loaded.batcher.close()


def _release_memory() -> None:
    """Hand a released session's memory back to the OS: collect cycles, then ask glibc to
    return freed heap pages (onnxruntime frees through malloc, which keeps them otherwise).
    Start-up objects are frozen out of the collector (app.py); they are thawed for this pass,
    so a version loaded at start-up is collected too, then what is still alive is frozen again."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _batcher_options(config: ModelConfig) -> BatcherOptions:
    batching = config.dynamic_batching
    return BatcherOptions(
        max_batch_size=config.max_batch_size,
        max_batch_tokens=batching.max_batch_tokens,
        max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
        max_queue_size=batching.max_queue_size,
    )


async def _warm_up(loaded: Loaded) -> None:
    """Real batches through tokenizer, batcher and session before the version is READY.

    Asks for every output so a graph that fails on any of them never turns READY, and runs a
    text of max_sequence_length tokens so a config that promises longer texts than the graph
    takes (its position table, say) fails here with a reason, not later on a caller's text.
    """
    config = loaded.config
    outputs = {name for n in config.pooling_layers for name in layer_outputs(n)}
    if config.task == Task.TASK_CLASSIFY:
        outputs.add(PROBABILITIES)
    texts = ["预热：今天股市大涨，沪指收复三千点。", "warm-up"]
    encoded = loaded.tokenizer.encode(texts, truncate=True)
    loop = asyncio.get_running_loop()
    item = WorkItem(encoded, frozenset(outputs), loop.create_future())
    await loaded.batcher.submit([item], wait=True)
    await item.future
    longest = config.max_sequence_length
    ids = np.resize(encoded.text_ids(0), longest)
    full = Encoded(ids, [longest], [0], [0])
    item = WorkItem(full, frozenset(outputs), loop.create_future())
    await loaded.batcher.submit([item], wait=True)
    try:
        await item.future
    except Exception as exc:
        raise ValueError(f"the model cannot run a text of max_sequence_length {longest} tokens "
                         f"({CONFIG_FILE} promises it): {exc}") from None
