"""Building, warming up and releasing a model version on this server's engines (the `Loader`
protocol of interface.py): onnxruntime, OpenVINO or the fake device, behind a Batcher.

Contract: the manager calls `build` then `warm_up` for a version it is loading, and `release` for
one it retires or abandons, all on the event loop; `build` does its blocking work (files, session
creation, checks) on a worker thread. A loader keeps no state about versions: the manager owns
them (repository/manager.py). A fake loader (tests) or another engine implements the same
three calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
from bertstream.v1.model_config_pb2 import ModelConfig, ModelQueuePolicy, Task

from ..metrics import Metrics
from ..version_format import (
    CONFIG_FILE,
    EXPORT_RECORD,
    IR_FILE,
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
from .backends.base import Backend, RuntimeOptions
from .backends.fake import FakeDevicePool, parse_spec
from .backends.onnxruntime import RuntimePool, pick_providers
from .backends.openvino import OpenVinoPool
from .batch import Batch, Encoded
from .batcher import Batcher, WorkItem
from .interface import Loaded
from .scheduler import BatcherOptions, LevelPolicy
from .tokenizer import TextTokenizer

__all__ = ["OnnxLoader", "open_version", "pin_mmap_threshold"]

log = logging.getLogger("bertstream.server.lifecycle")
CHECK_TEXTS = (
    "央行宣布降准0.5个百分点，释放长期资金约1万亿元。",
    "今天股市大涨，沪指收复三千点，两市成交额突破万亿。",
    "暴雨",
    "苹果发布iPhone 15，售价5999元起；分析师认为需求将回暖。" * 3,
)


class OnnxLoader:
    """onnxruntime sessions (or the fake device pool of `--fake-device`) behind a Batcher."""

    def __init__(self, options: RuntimeOptions, metrics: Metrics | None = None) -> None:
        self.options = options
        self.metrics = metrics

    async def build(self, model: str, version: int, path: Path,
                    config: ModelConfig) -> Loaded:
        runtime, tokenizer, labels = await asyncio.to_thread(
            _build, path, config, self.options)
        observer = self.metrics.batch_observer(model, version) if self.metrics else None
        options = dataclasses.replace(_batcher_options(config), instances=runtime.concurrency)
        batcher = Batcher(runtime.run, options, observer, model=(model, version))
        return Loaded(config, tokenizer, batcher, labels, runtime.provider,
                      runtime.busy_seconds)

    async def warm_up(self, loaded: Loaded) -> None:
        await _warm_up(loaded)

    async def release(self, loaded: Loaded, trim: bool) -> None:
        await loaded.batcher.close()
        if trim:
            await asyncio.to_thread(_release_memory)


def _check_outputs(config: ModelConfig,
                   runtime: Backend) -> None:
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
    path: Path, config: ModelConfig, options: RuntimeOptions
) -> tuple[Backend, TextTokenizer, list[str]]:
    """Blocking part of a load: files, session, checks. Runs on a worker thread."""
    model_file = path / MODEL_FILE
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing")
    tokenizer = TextTokenizer(path / TOKENIZER_FILE, config.max_sequence_length)
    labels = _read_labels(path, config)
    engine = pick_engine(config, options)
    try:
        instances = sum(group.count or 1 for group in config.instance_group)
        if options.fake_device:  # benchmarks: GPU timing without a GPU (backends/fake.py)
            runtime: Backend = FakeDevicePool(
                model_file, parse_spec(options.fake_device), instances, options.gpu_id)
        elif engine == "openvino":
            runtime = _openvino_or_onnxruntime(path, config, options, tokenizer, instances)
        else:
            runtime = RuntimePool(model_file, options, instances)
    except Exception as exc:
        read = IR_FILE if engine == "openvino" and (path / IR_FILE).is_file() else MODEL_FILE
        raise ValueError(f"{engine} cannot load {read}: {exc}") from None
    _check_outputs(config, runtime)
    _warn_if_untrained(path)
    return runtime, tokenizer, labels


def open_version(path: Path, config: ModelConfig, options: RuntimeOptions
                 ) -> tuple[Backend, TextTokenizer]:
    """A version's runtime and tokenizer exactly as a load builds them (engine choice, bf16
    check, output checks), without a batcher: for tools that must compute the server's own
    vectors (bertstream-train-head's features). Blocking."""
    runtime, tokenizer, _ = _build(path, config, options)
    return runtime, tokenizer


def _openvino_or_onnxruntime(path: Path, config: ModelConfig, options: RuntimeOptions,
                             tokenizer: TextTokenizer,
                             instances: int) -> Backend:
    """OpenVINO; where only `--cpu-engine auto` chose it (the config names no backend) and
    OpenVINO cannot run this graph, onnxruntime, with the reason in the log."""
    ir = path / IR_FILE
    try:
        pool = OpenVinoPool(ir if ir.is_file() else path / MODEL_FILE,
                            {key: value.string_value for key, value in config.parameters.items()},
                            options.intra_op_threads, _check_batch(tokenizer))
        _check_outputs(config, pool)
        return pool
    except Exception as exc:
        if config.backend:
            raise
        log.warning("%s: OpenVINO cannot run it (%s); serving it on onnxruntime", path, exc)
        return RuntimePool(path / MODEL_FILE, options, instances)


def pick_engine(config: ModelConfig, options: RuntimeOptions) -> str:
    """The engine of a version: its config's backend, else --cpu-engine on a CPU
    (auto: OpenVINO where it is installed), onnxruntime where CUDA serves it."""
    if config.backend:
        return config.backend
    if options.cpu_engine == "onnxruntime":
        return "onnxruntime"
    if pick_providers(options)[0] != "CPUExecutionProvider":
        return "onnxruntime"
    if options.cpu_engine == "openvino":
        return "openvino"
    return "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"


def _check_batch(tokenizer: TextTokenizer) -> Batch:
    """What OpenVINO's bf16 is checked against f32 on at load: Chinese news-like texts of a
    few lengths, and a mixed-script one."""
    encoded = tokenizer.encode(list(CHECK_TEXTS), truncate=True)
    return Batch.of(encoded)


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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Keep large allocations in their own mappings for the life of the process.

    glibc raises its mmap threshold each time a mapped block is freed, up to that block's
    size; from then on blocks of that size come from the heap, where freed ones fragment it
    and stay resident. Each version's warm-up measures a few batch shapes (its cost model), so
    every swap freed a few such blocks: resident memory grew ~2 MB a swap (150 -> 187 MiB
    over 20 swaps of a tiny model; flat with the threshold pinned). Setting it fixes the
    threshold and turns that adjustment off."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)


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
    """config.pbtxt's dynamic_batching (normalised: every default filled in)."""
    batching = config.dynamic_batching
    levels = int(batching.priority_levels)
    policies = tuple(_level_policy(batching.priority_queue_policy[n])
                     if n in batching.priority_queue_policy
                     else _level_policy(batching.default_queue_policy)
                     for n in range(1, levels + 1))
    return BatcherOptions(
        max_batch_size=config.max_batch_size,
        max_batch_tokens=batching.max_batch_tokens,
        max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
        max_queue_size=batching.max_queue_size,
        max_queue_wait_s=batching.max_queue_wait_microseconds / 1e6,
        levels=levels,
        default_level=int(batching.default_priority_level),
        policies=policies,
        max_batch_duration_s=batching.max_batch_duration_microseconds / 1e6,
        max_skipped_batches=batching.max_skipped_batches,
    )


def _level_policy(policy: ModelQueuePolicy) -> LevelPolicy:
    return LevelPolicy(
        timeout_s=policy.default_timeout_microseconds / 1e6,
        delay=policy.timeout_action == ModelQueuePolicy.DELAY,
        allow_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
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
    cost = loaded.cost = await loaded.batcher.calibrate(encoded.text_ids(0), sorted(outputs),
                                                        longest)
    log.info("%s: a batch costs %.2f ms + %.3f us per padded token (fitted to %d measured "
             "batches)", config.name, cost.a_s * 1e3, cost.b_s * 1e6, len(cost.points))
