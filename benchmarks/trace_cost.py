"""What tracing (server/tracing.py) costs per request, in CPU microseconds, in one process:

- off (no --trace-endpoint): the hooks a request passes are `if TRACE.on:` tests; timed here
  as the gRPC unary path passes them in a `--frontends N` server (the most: 3 in the
  pipeline, 1 in the front end's submit, 1 for the engine's message, 1 enqueue, 1 batch);
- on, not sampled: the request span's sampling decision and the same tests;
- on, sampled: the request span and its six children (validate, tokenize, queue, run, batch,
  respond) built on the event loop, plus their OTLP protobuf encoding (what the exporter's
  thread does before the network), all on this process's CPU clock.

    .venv/bin/python benchmarks/trace_cost.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from bertstream.server.tracing import TRACE, TraceOptions


class _Encoding:
    """An exporter that encodes spans as the OTLP exporter does, then drops them."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _Item:
    def __init__(self) -> None:
        self.trace: Any = None
        self.enqueued_at = time.perf_counter()
        self.priority = 1


def _off_hooks() -> None:
    """The tests one unary call passes with tracing off, written as the hooks are."""
    if TRACE.on:
        TRACE.validated("m", 1, 1)
    if TRACE.on:
        TRACE.tokenized([12])
    if TRACE.on:
        TRACE.enqueued([])
    trace = TRACE.traceparent() if TRACE.on else None
    if trace:
        TRACE.remote(trace)
    if TRACE.on:
        TRACE.batch([], 0.0, ("m", 1))
    if TRACE.on:
        TRACE.answered()


def _nothing() -> None:
    pass


def _request() -> None:
    """One request through every hook, as the single process runs them."""
    with TRACE.request("bertstream.v1.BertService/Embed", None,
                       {"rpc.system": "grpc", "rpc.method": "Embed"}):
        TRACE.validated("m", 1, 1)
        TRACE.tokenized([12])
        item = _Item()
        TRACE.enqueued([item])
        TRACE.batch([(12, item, 0)], time.perf_counter(), ("m", 1))
        TRACE.answered()


def _per_call_us(fn: Callable[[], None], n: int, clock: Callable[[], float]) -> float:
    """The best of 20 rounds of `n` calls (flushing spans between rounds)."""
    best = float("inf")
    for _ in range(20):
        started = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - started) / n * 1e6)
        if TRACE.on:
            TRACE.flush()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    n = parser.parse_args().requests
    empty = _per_call_us(_nothing, n, time.thread_time)
    off = _per_call_us(_off_hooks, n, time.thread_time) - empty
    print(f"off: {off * 1e3:.0f} ns per request for its 7 tests (a bare call: "
          f"{empty * 1e3:.0f} ns)")
    for rate, what in ((0.0, "on, not sampled"), (1.0, "on, sampled")):
        TRACE.configure(TraceOptions("memory", rate, schedule_delay_s=0.05), "bench",
                        exporter=_Encoding())
        loop_us = _per_call_us(_request, 100, time.thread_time)
        TRACE.flush()
        started = time.process_time()
        for i in range(n // 4):
            _request()
            if i % 100 == 99:  # within the processor's queue (2,048 spans): none dropped
                TRACE.flush()
        TRACE.close()  # the exporter thread's encoding of every span, flushed here
        process_us = (time.process_time() - started) / (n // 4) * 1e6
        print(f"{what}: {loop_us:.1f} us per request on the event loop, {process_us:.1f} us "
              "with the span export's encoding")


if __name__ == "__main__":
    main()
