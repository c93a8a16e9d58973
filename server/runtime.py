"""One onnxruntime session of one model version: `run(Batch, outputs) -> arrays`.

Synchronous and thread-safe (onnxruntime sessions accept concurrent `run` calls); the batcher
calls it from worker threads. Never imports grpc.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .stages import CLOCK
from .tokenization import Encoded
from .version_format import INPUT_NAMES, MODEL_FILE

__all__ = ["Batch", "BusyMeter", "Runtime", "RuntimeOptions", "RuntimePool", "pick_providers",
           "usable_cores"]



@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built; one value for the whole server, made in app.py."""

    device: str = "auto"  # auto | cpu | gpu
    gpu_id: int = 0
    intra_op_threads: int = 0  # 0: the cores this process may use
    # onnxruntime's pool threads spin-wait for work between runs by default: on a machine
    # whose cores also tokenize and serve gRPC, that spinning takes CPU they need.
    intra_op_spinning: bool = False
    fake_device: str = ""  # a fakedevice.py spec: benchmarks only; "" runs the real graph
    cpu_engine: str = "auto"  # auto | onnxruntime | openvino: versions naming no backend


@dataclass(frozen=True)
class Batch:
    """Padded inputs of one batch; row r belongs to the batcher's r-th item."""

    input_ids: np.ndarray  # int64 [batch, seq]
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    @classmethod
    def pad(cls, rows: Sequence[tuple[Encoded, int]], pad_id: int = 0) -> Batch:
        """Right-pad texts (request, index of the text in it) into one batch; the attention
        mask marks real tokens. The real tokens go in with one boolean-mask assignment."""
        lengths = np.array([encoded.lengths[i] for encoded, i in rows], dtype=np.int64)
        longest = int(lengths.max())
        real = np.arange(longest) < lengths[:, None]
        ids = np.full(real.shape, pad_id, dtype=np.int64)
        ids[real] = np.concatenate([encoded.text_ids(i) for encoded, i in rows])
        types = np.zeros(real.shape, dtype=np.int64)
        if any(encoded.type_ids is not None for encoded, _ in rows):
            types[real] = np.concatenate([_type_ids(encoded, i) for encoded, i in rows])
        return cls(ids, real.astype(np.int64), types)

    @classmethod
    def of(cls, encoded: Encoded, indices: Sequence[int] | None = None) -> Batch:
        """The texts of one request (all, or those at `indices`) as a batch."""
        chosen = range(len(encoded)) if indices is None else indices
        return cls.pad([(encoded, i) for i in chosen])

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def _type_ids(encoded: Encoded, i: int) -> np.ndarray:
    if encoded.type_ids is None:
        return np.zeros(encoded.lengths[i], dtype=np.int64)
    return encoded.type_ids[encoded.starts[i]:encoded.starts[i] + encoded.lengths[i]]


def pick_providers(options: RuntimeOptions) -> list[str | tuple[str, dict[str, object]]]:
    """CUDA when onnxruntime has it and the model may use a GPU; CPU otherwise."""
    available = ort.get_available_providers()
    if options.device == "gpu" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("a GPU was requested but onnxruntime has no CUDAExecutionProvider")
    if options.device != "cpu" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": options.gpu_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Runtime:
    """An onnxruntime session plus what the server needs to know about its graph."""

    def __init__(self, model_path: Path, options: RuntimeOptions) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads or usable_cores()
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "1" if options.intra_op_spinning else "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(model_path), sess_options=so, providers=pick_providers(options)
        )
        self.provider = self.session.get_providers()[0]
        # On a GPU, IO binding copies the inputs once and brings back only the outputs asked
        # for, straight from device memory (measured on an H100: ~3 % over session.run).
        self._device_id = options.gpu_id
        self.io_binding = self.provider == "CUDAExecutionProvider"
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = [n for n in INPUT_NAMES if n not in self.input_names]
        if missing:
            raise ValueError(f"{MODEL_FILE} lacks the inputs {missing}")
        # Trailing dims of each output, e.g. {"mean_layer12": (768,)}; None where dynamic.
        self.output_dims: dict[str, tuple[int | None, ...]] = {
            o.name: tuple(d if isinstance(d, int) else None for d in o.shape[1:])
            for o in self.session.get_outputs()
        }

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch, asking onnxruntime only for the outputs this batch needs."""
        started = CLOCK.start()
        try:
            return self._run(batch, outputs)
        finally:
            CLOCK.stop("device", started)

    def _run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        names = list(outputs)
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        if self.io_binding:
            return self._run_bound(feeds, names)
        arrays = self.session.run(names, feeds)
        return dict(zip(names, arrays, strict=True))

    def _run_bound(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, "cuda", self._device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


class RuntimePool:
    """The sessions of one model version: `instance_group { count: N }` makes N (Triton's
    meaning: N model instances running batches at the same time). On a CPU the cores are
    split between them; on a GPU each session also takes two batches at once, so copying and
    host work for one overlaps the other's kernels. `run` borrows a free slot."""

    def __init__(self, model_path: Path, options: RuntimeOptions, count: int = 1) -> None:
        count = max(1, count)
        threads = options.intra_op_threads or max(1, usable_cores() // count)
        self.runtimes = [Runtime(model_path, dataclasses.replace(options,
                                                                 intra_op_threads=threads))
                         for _ in range(count)]
        first = self.runtimes[0]
        self.provider, self.output_dims = first.provider, first.output_dims
        self.slots_per_session = 2 if first.io_binding else 1
        self._free: queue.SimpleQueue[Runtime] = queue.SimpleQueue()
        for runtime in self.runtimes:
            for _ in range(self.slots_per_session):
                self._free.put(runtime)
        self._busy = BusyMeter()

    @property
    def concurrency(self) -> int:
        """How many batches may run at once: what the batcher should keep in flight."""
        return len(self.runtimes) * self.slots_per_session

    def busy_seconds(self) -> float:
        return self._busy.seconds()

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        runtime = self._free.get()
        self._busy.enter()
        try:
            return runtime.run(batch, outputs)
        finally:
            self._busy.leave()
            self._free.put(runtime)


class BusyMeter:
    """Seconds during which at least one batch was running: how busy the device was, also
    when several batches overlap on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0
        self._total = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._total += time.perf_counter() - self._since

    def seconds(self) -> float:
        with self._lock:
            running = time.perf_counter() - self._since if self._running else 0.0
            return self._total + running
