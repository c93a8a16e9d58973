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
import enum
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bertstream.v1.model_config_pb2 import ModelConfig, Task

from . import repository
from .batcher import Batcher, BatcherOptions, WorkItem
from .errors import ModelNotFound, ModelNotReady
from .runtime import Runtime, RuntimeOptions
from .tokenization import TextTokenizer

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

POOLED_OUTPUTS = ("mean", "max", "cls", "mean_max", "tokens")


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
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.model}/{self.version}: {self.state.name} -> {new.name}")
        log.info("%s version %d: %s -> %s %s", self.model, self.version, self.state.name,
                 new.name, reason)
        self.state, self.reason = new, reason


def _check_outputs(config: ModelConfig, runtime: Runtime) -> None:
    """The graph must offer what config.pbtxt promises, with the promised sizes."""
    dims = runtime.output_dims
    hidden = config.embedding_dimension
    for layer in config.pooling_layers:
        for pooling in POOLED_OUTPUTS:
            name = f"{pooling}_layer{layer}"
            if name not in dims:
                raise ValueError(f"model.onnx has no output {name!r} that config.pbtxt implies")
            want = 2 * hidden if pooling == "mean_max" else hidden
            if dims[name][-1] not in (None, want):
                raise ValueError(
                    f"output {name!r} has size {dims[name][-1]}, config.pbtxt says {want}"
                )
    if config.task == Task.TASK_CLASSIFY:
        if "probabilities" not in dims:
            raise ValueError("a TASK_CLASSIFY model.onnx needs a 'probabilities' output")
        if dims["probabilities"][-1] not in (None, config.num_labels):
            raise ValueError(
                f"the head has {dims['probabilities'][-1]} classes, config.pbtxt says "
                f"{config.num_labels}"
            )


def _read_labels(path: Path, config: ModelConfig) -> list[str]:
    if config.task != Task.TASK_CLASSIFY:
        return []
    labels_file = path / "labels.txt"
    if not labels_file.is_file():
        raise ValueError("labels.txt is missing")
    labels = [line.strip() for line in labels_file.read_text("utf-8").splitlines() if line.strip()]
    if len(labels) != config.num_labels:
        raise ValueError(f"labels.txt has {len(labels)} labels, config.pbtxt says "
                         f"{config.num_labels}")
    return labels


def _build(
    path: Path, config: ModelConfig, options: RuntimeOptions
) -> tuple[Runtime, TextTokenizer, list[str]]:
    """Blocking part of a load: files, session, checks. Runs on a worker thread."""
    model_file = path / "model.onnx"
    if not model_file.is_file():
        raise ValueError("model.onnx is missing")
    if not (path / "tokenizer.json").is_file():
        raise ValueError("tokenizer.json is missing")
    tokenizer = TextTokenizer(path / "tokenizer.json", config.max_sequence_length)
    labels = _read_labels(path, config)
    try:
        runtime = Runtime(model_file, options)
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot load model.onnx: {exc}") from None
    _check_outputs(config, runtime)
    _warn_if_untrained(path)
    return runtime, tokenizer, labels


def _warn_if_untrained(path: Path) -> None:
    """Say loudly when a version's weights are random-init (test and placeholder models)."""
    try:
        record = json.loads((path / "export.json").read_text("utf-8"))
    except (OSError, ValueError):
        return
    head = record.get("head") or {}
    if record.get("source_kind") == "random":
        log.warning("%s: random-init encoder weights (export source 'random'): its vectors and "
                    "labels carry no meaning; export a real checkpoint for real use", path)
    elif str(head.get("origin", "")).startswith("random"):
        log.warning("%s: the classification head is random-init: its labels carry no meaning",
                    path)


class ModelManager:
    """All models of one repository and the versions of each."""

    def __init__(self, root: Path, runtime_options: RuntimeOptions,
                 default_model: str = "") -> None:
        self.root = root
        self.runtime_options = runtime_options
        self._default = default_model
        self.versions: dict[str, dict[int, ModelVersion]] = {}
        self.model_errors: dict[str, str] = {}

    async def load_all(self) -> None:
        """Load what the version policy of every model serves (model-control-mode none)."""
        for name, entry in repository.scan(self.root).items():
            self.versions.setdefault(name, {})
            if entry.config is None:
                self.model_errors[name] = entry.config_error or "unreadable config"
                log.error("model %s: %s", name, self.model_errors[name])
                continue
            if not entry.served_versions():
                self.model_errors[name] = "no version folder matches the version policy"
            for version in entry.served_versions():
                await self._load(name, version, entry.versions[version], entry.config)

    async def _load(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        mv = ModelVersion(name, version, path)
        self.versions[name][version] = mv
        mv.transition(State.LOADING)
        try:
            runtime, tokenizer, labels = await asyncio.to_thread(
                _build, path, config, self.runtime_options
            )
            batcher = Batcher(runtime.run, _batcher_options(config))
            mv.loaded = Loaded(config, tokenizer, batcher, labels, runtime.provider)
            await _warm_up(mv.loaded)
        except Exception as exc:
            if mv.loaded is not None:
                await mv.loaded.batcher.close()
                mv.loaded = None
            mv.transition(State.UNAVAILABLE, f"load failed: {exc}")
            return
        mv.transition(State.READY)

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

    @contextmanager
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
        for versions in self.versions.values():
            for mv in versions.values():
                if mv.state is State.READY and mv.loaded is not None:
                    mv.transition(State.UNLOADING)
                    await mv.loaded.batcher.close()
                    mv.transition(State.UNAVAILABLE, "server stopped")


def _batcher_options(config: ModelConfig) -> BatcherOptions:
    batching = config.dynamic_batching
    return BatcherOptions(
        max_batch_size=config.max_batch_size,
        max_batch_tokens=batching.max_batch_tokens,
        max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
        max_queue_size=batching.max_queue_size,
        instances=max(1, sum(g.count or 1 for g in config.instance_group)),
    )


async def _warm_up(loaded: Loaded) -> None:
    """One real batch through tokenizer, batcher and session before the version is READY.

    Asks for every output so a graph that fails on any of them never turns READY.
    """
    config = loaded.config
    outputs = {f"{p}_layer{n}" for p in POOLED_OUTPUTS for n in config.pooling_layers}
    if config.task == Task.TASK_CLASSIFY:
        outputs.add("probabilities")
    texts = ["预热：今天股市大涨，沪指收复三千点。", "warm-up"]
    encoded = loaded.tokenizer.encode(texts, truncate=True)
    loop = asyncio.get_running_loop()
    items = [WorkItem(e, frozenset(outputs), loop.create_future()) for e in encoded]
    await loaded.batcher.submit(items, wait=True)
    await asyncio.gather(*(item.future for item in items))
