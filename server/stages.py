"""The stage budget: where a text's CPU time goes, stage by stage and thread by thread.

Two views, both exported on /metrics and read by benchmarks/bench.py:
- `bertstream_thread_cpu_seconds_total{thread}`: CPU time of every thread of the process,
  grouped by job (the event loop, the tokenizer pool, the runtime threads, onnxruntime's own
  pool and gRPC's core threads). Read from /proc at scrape time: free while serving.
- `bertstream_stage_cpu_seconds_total{stage}`: CPU time inside each instrumented stage
  (decode, validate, tokenize, batch formation, pad, device call, scatter, response building,
  encode), from the thread's CPU clock around each piece of code. Off unless the server runs
  with `--stage-timing` (a clock read costs ~0.4 us; a stage costs two).

The clock is one object per process (`CLOCK`), like prometheus_client's default registry:
stages live in the tokenizer, the batcher and the runtime, which share nothing else.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CLOCK", "STAGES", "THREAD_GROUPS", "Stage", "StageClock",
           "ThreadCpuCollector"]

class Stage(NamedTuple):
    thread: str  # the thread group it runs on (see THREAD_GROUPS)
    gil: bool  # holds the GIL while it runs: serial, whatever thread it is on
    what: str


# Every timed stage, in the order a text meets them; benchmarks/stage_budget.py reads these.
STAGES: dict[str, Stage] = {
    "decode": Stage("event-loop", True, "receive: request bytes -> proto"),
    "validate": Stage("event-loop", True, "validation: limits, options -> query"),
    "tokenize_native": Stage("tokenize", False, "tokenization in Rust (GIL released)"),
    "tokenize_python": Stage("tokenize", True, "tokenization: encodings -> numpy"),
    "batch": Stage("event-loop", True, "batch formation: work items, queue, pick"),
    "pad": Stage("runtime", True, "padding a batch"),
    "device": Stage("runtime", False, "device: session.run / fake device"),
    "scatter": Stage("runtime", True, "scatter: batch rows -> requests' arrays"),
    "resolve": Stage("event-loop", True, "futures, results, normalisation"),
    "respond": Stage("event-loop", True, "response protos"),
    "encode": Stage("event-loop", True, "send: response proto -> bytes"),
}
# Thread groups of `bertstream_thread_cpu_seconds_total`: (holds the GIL, what its CPU beyond
# its timed stages is).
THREAD_GROUPS: dict[str, tuple[bool, str]] = {
    "event-loop": (True, "gRPC receive/send, asyncio, metrics (rest of the loop)"),
    "tokenize": (True, "tokenizer pool: hand-off"),
    "runtime": (True, "runtime threads: hand-off, outputs"),
    # Unnamed native threads: onnxruntime's intra-op pool, and tokenizers' rayon pool when
    # TOKENIZERS_PARALLELISM is turned back on (the server turns it off).
    "onnxruntime-pool": (False, "onnxruntime's (or tokenizers' rayon) pool threads"),
    "grpc": (False, "gRPC core threads (C, no GIL)"),
    "python-other": (True, "other Python threads"),
    "native-other": (False, "other native threads"),
}


class StageClock:
    """CPU nanoseconds per stage, summed over every thread that runs it.

    `t = CLOCK.start(); ...; CLOCK.stop("pad", t)`: both are no-ops (a few tens of ns) while
    the clock is off, so instrumented code stays in place in production."""

    def __init__(self) -> None:
        self.enabled = False
        self._ns = dict.fromkeys(STAGES, 0)
        self._lock = threading.Lock()  # stages run on several threads at once

    def start(self) -> int:
        return time.thread_time_ns() if self.enabled else 0

    def stop(self, stage: str, started: int) -> int:
        """Add the CPU time since `started` to `stage`; returns now (to chain stages)."""
        if not self.enabled:
            return 0
        now = time.thread_time_ns()
        with self._lock:
            self._ns[stage] += now - started
        return now

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return {stage: ns / 1e9 for stage, ns in self._ns.items()}


CLOCK = StageClock()


class ThreadCpuCollector(Collector):
    """`bertstream_thread_cpu_seconds_total{thread}` from /proc/self/task at scrape time.

    Threads are grouped by what they do: Python threads by their name (the executors name
    theirs "tokenize_N" and "runtime_N"), the main thread is the event loop, native threads
    by the name they gave themselves (gRPC's "grpc_*", "default-executo", ...); native
    threads that kept the process's name are onnxruntime's intra-op pool (and tokenizers'
    rayon pool, if TOKENIZERS_PARALLELISM was turned back on)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("bertstream_thread_cpu_seconds",
                                     "CPU time of the server's threads, by job", labels=["thread"])
        for group, seconds in sorted(thread_cpu_seconds().items()):
            family.add_metric([group], seconds)
        yield family


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds per thread group; empty where /proc is not there (not Linux)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    main_id = threading.main_thread().native_id
    process_name = _comm(Path("/proc/self"))
    totals: dict[str, float] = {}
    for task in tasks.iterdir():
        try:
            tid = int(task.name)
            seconds = _cpu_seconds(task)
            comm = _comm(task)
        except (OSError, ValueError):
            continue  # the thread ended while we read it
        group = _group(tid, main_id, python_names.get(tid), comm, process_name)
        totals[group] = totals.get(group, 0.0) + seconds
    return totals


def _group(tid: int, main_id: int | None, python_name: str | None, comm: str,
           process_name: str) -> str:
    if tid == main_id:
        return "event-loop"
    if python_name is not None:
        for prefix in ("tokenize", "runtime"):
            if python_name.startswith(prefix):
                return prefix
        return "python-other"
    if comm.startswith(("grpc", "default-executo", "resolver-execu", "event_engine",
                        "timer_manager", "global-timer")):
        return "grpc"
    if comm == process_name:
        return "onnxruntime-pool"
    return "native-other"


def _comm(task: Path) -> str:
    return (task / "comm").read_text().strip()


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(task: Path) -> float:
    """Time on a CPU: schedstat's nanoseconds where the kernel keeps them, else stat's
    user + system ticks (10 ms resolution)."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS


class StageCollector(Collector):
    def __init__(self, clock: StageClock) -> None:
        self.clock = clock

    def collect(self) -> Iterator[CounterMetricFamily]:
        if not self.clock.enabled:
            return
        family = CounterMetricFamily("bertstream_stage_cpu_seconds",
                                     "CPU time inside each pipeline stage (--stage-timing)",
                                     labels=["stage"])
        for stage, seconds in self.clock.seconds().items():
            family.add_metric([stage], seconds)
        yield family
