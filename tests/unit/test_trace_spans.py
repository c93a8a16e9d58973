"""server/tracing.py in one process, exported to memory: the stage spans of a request, the
batch span's shape and links, the traceparent a front end sends the engine, sampling; and
that a server without --trace-endpoint never imports OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bertstream.server.options import parse_args
from bertstream.server.tracing import TRACE, TraceOptions

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


@pytest.fixture
def traced() -> Iterator[Any]:
    """TRACE on (every call sampled) into memory; `traced(rate)` for another rate. Read the
    spans after `TRACE.close()`, which flushes them."""
    exporter = InMemorySpanExporter()

    def configure(rate: float = 1.0) -> InMemorySpanExporter:
        TRACE.configure(TraceOptions("memory", rate), "test", exporter=exporter)
        return exporter

    yield configure
    TRACE.close()


class _Item:
    """What the batch hook reads of a WorkItem (hashed by identity, as WorkItem is)."""

    def __init__(self) -> None:
        self.trace: Any = None
        self.enqueued_at = time.perf_counter()
        self.priority = 2


def _item() -> _Item:
    return _Item()


def test_a_request_gets_its_stage_spans_and_its_batches(traced: Any) -> None:
    exporter = traced()
    item, other = _item(), _item()
    with TRACE.request("svc/Embed", None, {"rpc.method": "Embed"}) as request:
        TRACE.validated("m", 3, 2)
        TRACE.tokenized([3, 5])
        TRACE.enqueued([item])
        first = time.perf_counter()
        # Its two texts ride in two batches; the second also carries an untraced request.
        TRACE.batch([(3, item, 0)], first, ("m", 3))
        TRACE.batch([(5, item, 1), (2, other, 0)], time.perf_counter(), ("m", 3))
        TRACE.answered()
    TRACE.close()
    spans = exporter.get_finished_spans()
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == ["batch", "queue", "respond", "run", "svc/Embed", "tokenize",
                               "validate"]
    assert [len(by_name[n]) for n in ("queue", "run", "batch")] == [1, 2, 2]
    root = request.get_span_context()
    for span in spans:
        if span.name != "svc/Embed":
            assert span.parent is not None and span.parent.span_id == root.span_id, span.name
    assert by_name["svc/Embed"][0].attributes["bertstream.model"] == "m"
    assert by_name["tokenize"][0].attributes["bertstream.tokens"] == 8
    second = max(by_name["batch"], key=lambda s: s.start_time)
    assert dict(second.attributes) == {
        "bertstream.model": "m", "bertstream.version": 3, "bertstream.batch.size": 2,
        "bertstream.batch.requests": 2, "bertstream.batch.padded_length": 5,
        "bertstream.batch.tokens": 7, "bertstream.batch.padded_tokens": 10,
        "bertstream.batch.padding": pytest.approx(0.3)}
    for batch in by_name["batch"]:  # linked to the traced request (only) it carried
        assert [link.context.span_id for link in batch.links] == [root.span_id]
    batch_ids = {b.context.span_id for b in by_name["batch"]}
    assert {run.links[0].context.span_id for run in by_name["run"]} == batch_ids
    (queue,) = by_name["queue"]
    assert queue.end_time == min(b.start_time for b in by_name["batch"])
    assert other.trace is None


def test_a_failed_batch_marks_its_spans(traced: Any) -> None:
    exporter = traced()
    item = _item()
    with TRACE.request("svc/Embed", None, {}):
        TRACE.enqueued([item])
        TRACE.batch([(4, item, 0)], time.perf_counter(), ("m", 1), RuntimeError("boom"))
    TRACE.close()
    failed = {s.name: s.status for s in exporter.get_finished_spans()}
    assert failed["batch"].status_code.name == "ERROR"
    assert failed["batch"].description == "RuntimeError"
    assert failed["run"].status_code.name == "ERROR"


def test_the_engine_continues_the_front_ends_span(traced: Any) -> None:
    """The traceparent a front end puts in Submit parents the engine's spans."""
    exporter = traced()
    item = _item()
    with TRACE.request("svc/Embed", None, {}) as request:
        header = TRACE.traceparent()
    assert header is not None
    item.trace = TRACE.remote(header)  # the engine process's side
    TRACE.batch([(4, item, 0)], time.perf_counter(), ("m", 1))
    TRACE.close()
    ours = request.get_span_context()
    engine = [s for s in exporter.get_finished_spans() if s.name in ("queue", "run", "batch")]
    assert len(engine) == 3
    for span in engine:
        assert span.context.trace_id == ours.trace_id
        assert span.parent is not None and span.parent.span_id == ours.span_id


def test_callers_decide_and_the_rate_decides_for_the_rest(traced: Any) -> None:
    exporter = traced(rate=0.0)
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TRACE.request("svc/Embed", TRACE.parent({"traceparent": caller}), {}) as span:
        assert span.is_recording()
        assert TRACE.traceparent() is not None
    unsampled = caller[:-2] + "00"
    with TRACE.request("svc/Embed", TRACE.parent({"traceparent": unsampled}), {}) as span:
        assert not span.is_recording()
        assert TRACE.traceparent() is None  # the engine is told nothing
        TRACE.validated("m", 1, 1)
    with TRACE.request("svc/Embed", TRACE.parent({}), {}) as span:
        assert not span.is_recording()  # rate 0, no caller
    TRACE.close()
    (exported,) = exporter.get_finished_spans()
    assert exported.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert exported.parent is not None and exported.parent.span_id == 0xB7AD6B7169203331


def test_hooks_are_inert_outside_a_sampled_request(traced: Any) -> None:
    exporter = traced()
    item = _item()
    TRACE.validated("m", 1, 1)
    TRACE.enqueued([item])
    TRACE.batch([(4, item, 0)], time.perf_counter(), ("m", 1))
    assert TRACE.traceparent() is None and item.trace is None
    TRACE.close()
    assert not exporter.get_finished_spans()


def test_flags() -> None:
    options = parse_args(["--trace-endpoint", "collector:4317", "--trace-rate", "0.5"])
    assert options.trace == TraceOptions("collector:4317", 0.5)
    assert parse_args([]).trace.endpoint == ""
    assert parse_args(["--trace-endpoint", "c:4317"]).trace.rate == TraceOptions.rate
    for wrong in (["--trace-rate", "0.5"], ["--trace-endpoint", "c:4317", "--trace-rate", "2"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)


def test_without_an_endpoint_opentelemetry_is_never_imported() -> None:
    code = ("import sys; from bertstream.server import app; "
            "from bertstream.server.options import parse_args; parse_args([]); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
