"""What every backend is to the engine: a `Backend` runs padded batches and says what it is.

onnxruntime's RuntimePool, OpenVINO's OpenVinoPool and the fake device's pool implement it; the
batcher only ever calls `run`, on its worker threads, so implementations are synchronous and
thread-safe. `RuntimeOptions` is the one value, made from the server's flags, that decides how
every version's backend is built.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..batch import Batch

__all__ = ["Backend", "BusyMeter", "RuntimeOptions", "usable_cores"]


class Backend(Protocol):
    """One model version's graph on one engine."""

    concurrency: int  # batches it runs at once (the batcher keeps that many in flight)
    output_dims: dict[str, tuple[int | None, ...]]  # each output's dims after the batch axis

    @property
    def provider(self) -> str:
        """What GetModel reports: engine, device, precision (and why, if not the asked one)."""
        ...

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs for every row of the batch; raises on a failed run."""
        ...

    def busy_seconds(self) -> float:
        """Seconds during which at least one batch was running (see BusyMeter)."""
        ...


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built; one value for the whole server, made in app.py."""

    device: str = "auto"  # auto | cpu | gpu
    gpu_id: int = 0
    intra_op_threads: int = 0  # 0: the cores this process may use
    # onnxruntime's pool threads spin-wait for work between runs by default: on a machine
    # whose cores also tokenize and serve gRPC, that spinning takes CPU they need.
    intra_op_spinning: bool = False
    fake_device: str = ""  # a fake.py spec: benchmarks only; "" runs the real graph
    cpu_engine: str = "auto"  # auto | onnxruntime | openvino: versions naming no backend


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
