"""OpenTelemetry traces: one span per call or stream message, with a child per stage, across
the front-end and engine processes (`--trace-endpoint HOST:PORT`, `--trace-rate R`).

The tracer is one object per process (`TRACE`), like the stage clock (stages.py): its spans
come from the protocol edges (api/traced.py opens the request span), the pipeline (validate,
tokenize, the answer), the batcher (queue, run, batch) and the link (the W3C traceparent a
front end sends with each request), which share nothing else. Off unless the server runs with
`--trace-endpoint`: every hook is behind `if TRACE.on:` (one attribute read) and opentelemetry
is not even imported.

A traced request's tree:

    <rpc> (SERVER, front end; the caller's traceparent as parent when it sent one)
    ├── validate     the request span's start -> its texts reach the tokenizer
    ├── tokenize     -> its token ids are ready
    ├── queue        (engine) enqueued -> the batch that first carries its texts starts
    ├── run          (engine) one per batch carrying its texts: pad, device, scatter
    │                (links to that batch's span)
    ├── batch        (engine, under the first traced request it carried) one per batch run,
    │                linked to every traced request it carried: size, padding, model
    └── respond      the pipeline's answer -> the handler returns (the response built)

Stage spans are made after the fact from the boundaries' timestamps, so the hot path never
holds a span open across an await, and unsampled requests make none. Sampling is
parent-based: a caller's sampled traceparent is always continued, an unsampled one never;
calls without one are sampled at `rate`. Each process exports its own spans through a
BatchSpanProcessor (a background thread), flushed at `close()`.

Contract: every method runs on the event loop (the request record lives in a contextvar of
the request's task); `batch` takes the perf_counter times the batcher already keeps.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACE", "ItemTrace", "TraceOptions", "Tracing", "tracing_installed"]

# The W3C trace context headers, as gRPC metadata keys and HTTP headers (lower case).
TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(frozen=True)
class TraceOptions:
    endpoint: str = ""  # an OTLP/gRPC receiver, HOST:PORT or http(s)://HOST:PORT; "": off
    rate: float = 0.01  # fraction of calls without a caller's decision that are traced
    schedule_delay_s: float = 0.5  # how long finished spans wait to be sent with others
    export_timeout_s: float = 5.0  # one export, retries included (bounds the flush at exit)


def tracing_installed() -> bool:
    """Whether the `tracing` extra (opentelemetry-sdk, the OTLP gRPC exporter) is here."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in (
        "opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"))


class ItemTrace:
    """A traced request as the batcher holds it (WorkItem.trace): the context its engine
    spans are children of, and whether its queue span was made."""

    __slots__ = ("context", "queued", "span_context")

    def __init__(self, context: Context, span_context: SpanContext) -> None:
        self.context = context
        self.span_context = span_context
        self.queued = False


@dataclass(eq=False)
class _Request:
    """A sampled request's span and the last stage boundary passed (ns since the epoch)."""

    span: Span
    context: Context  # with `span` as the parent
    mark: int
    answered: int = 0


_REQUEST: ContextVar[_Request | None] = ContextVar("bertstream_trace_request", default=None)


class Tracing:
    """The process's tracer. `on` is False until `configure`; hooks check it first."""

    def __init__(self) -> None:
        self.on = False
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._api: ModuleType  # opentelemetry.trace, once configured
        self._propagator: TraceContextTextMapPropagator

    # -- set-up ---------------------------------------------------------------------------

    def configure(self, options: TraceOptions, process: str, exporter: Any = None) -> None:
        """Start exporting this process's spans (`exporter`: tests pass an in-memory one)."""
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import server_version

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=options.endpoint, insecure=not options.endpoint.startswith("https://"),
                timeout=options.export_timeout_s)
        resource = Resource.create({
            "service.name": "bertstream", "service.version": server_version(),
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            "bertstream.process": process,
        })
        provider = TracerProvider(resource=resource,
                                  sampler=ParentBased(TraceIdRatioBased(options.rate)))
        provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=options.schedule_delay_s * 1e3,
            export_timeout_millis=options.export_timeout_s * 1e3))
        self._api = trace
        self._propagator = TraceContextTextMapPropagator()
        self._provider = provider
        self._tracer = provider.get_tracer("bertstream.server", server_version())
        self.on = True

    def flush(self) -> None:
        """Send every finished span now (benchmarks; `close` does it at exit)."""
        if self._provider is not None:
            self._provider.force_flush()

    def close(self) -> None:
        """Send what is left and stop (at most about one export timeout)."""
        self.on = False
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            provider.shutdown()

    # -- the protocol edges: one span per call or stream message ---------------------------

    def parent(self, carrier: Mapping[str, str]) -> Context | None:
        """The caller's context from its W3C headers (None: it sent none)."""
        if "traceparent" not in carrier:
            return None
        return self._propagator.extract(carrier)

    @contextlib.contextmanager
    def request(self, name: str, parent: Context | None,
                attributes: Mapping[str, Any]) -> Iterator[Span]:
        """The span of one call or stream message; while it runs, the stage hooks below add
        its children. Ends with a `respond` child when the pipeline answered."""
        assert self._tracer is not None
        span = self._tracer.start_span(name, context=parent, kind=self._api.SpanKind.SERVER,
                                       attributes=attributes)
        if not span.is_recording():  # not sampled: no children, nothing sent on
            yield span
            return
        record = _Request(span, self._api.set_span_in_context(span),
                          span.start_time or time.time_ns())
        token = _REQUEST.set(record)
        try:
            yield span
        finally:
            _REQUEST.reset(token)
            if record.answered:
                self._child(record.context, "respond", record.answered, time.time_ns())
            span.end()

    # -- the pipeline's stage boundaries ------------------------------------------------------

    def validated(self, model: str, version: int, texts: int) -> None:
        """The request's texts go to the tokenizer: `validate` ends."""
        record = _REQUEST.get()
        if record is not None:
            record.span.set_attributes({"bertstream.model": model, "bertstream.version": version,
                                        "bertstream.texts": texts})
            record.mark = self._child(record.context, "validate", record.mark, time.time_ns())

    def tokenized(self, lengths: Sequence[int]) -> None:
        """Its token ids are ready: `tokenize` ends."""
        record = _REQUEST.get()
        if record is not None:
            record.mark = self._child(record.context, "tokenize", record.mark, time.time_ns(),
                                      {"bertstream.tokens": sum(lengths)})

    def answered(self) -> None:
        """The pipeline has its result: `respond` starts."""
        record = _REQUEST.get()
        if record is not None:
            record.answered = time.time_ns()

    # -- the engine: its link, queue and batches ----------------------------------------------

    def traceparent(self) -> str | None:
        """The current request's span as a W3C traceparent, for the engine (None: the
        request is not sampled, and the engine makes no spans for it)."""
        record = _REQUEST.get()
        if record is None:
            return None
        sc = record.span.get_span_context()
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def remote(self, traceparent: str | None) -> ItemTrace | None:
        """A request's trace in the engine process, from the front end's traceparent."""
        if not traceparent or not self.on:
            return None
        context = self._propagator.extract({"traceparent": traceparent})
        span_context = self._api.get_current_span(context).get_span_context()
        return ItemTrace(context, span_context) if span_context.is_valid else None

    def enqueued(self, items: Sequence[Any]) -> None:
        """Items queued from a traced request's own task (one process: the pipeline's
        submit) take its span as their parent; the engine process set theirs from the
        link (`remote`)."""
        record = _REQUEST.get()
        if record is None:
            return
        for item in items:
            if item.trace is None:
                item.trace = ItemTrace(record.context, record.span.get_span_context())

    def batch(self, texts: Sequence[tuple[int, Any, int]], start: float,
              model: tuple[str, int], error: BaseException | None = None) -> None:
        """A batch ran (or failed) from perf_counter `start` to now: its span, and each
        traced request's `queue` (once) and `run`. `texts`: (length, item, index)."""
        traced: dict[Any, ItemTrace] = {}
        for _, item, _ in texts:
            if item.trace is not None:
                traced[item] = item.trace
        if not traced:
            return
        assert self._tracer is not None
        link = self._api.Link
        end_ns, end = time.time_ns(), time.perf_counter()

        def wall(t: float) -> int:  # a perf_counter time as ns since the epoch
            return end_ns - int((end - t) * 1e9)

        start_ns = wall(start)
        lengths = [length for length, _, _ in texts]
        longest = max(lengths)
        padded = longest * len(lengths)
        first = next(iter(traced.values()))
        span = self._tracer.start_span(
            "batch", context=first.context, start_time=start_ns,
            links=[link(t.span_context) for t in traced.values()],
            attributes={
                "bertstream.model": model[0], "bertstream.version": model[1],
                "bertstream.batch.size": len(lengths),
                "bertstream.batch.requests": len({id(item) for _, item, _ in texts}),
                "bertstream.batch.padded_length": longest,
                "bertstream.batch.tokens": sum(lengths),
                "bertstream.batch.padded_tokens": padded,
                "bertstream.batch.padding": 1.0 - sum(lengths) / padded,
            })
        if error is not None:
            self.fail(span, type(error).__name__)
        span.end(end_time=end_ns)
        to_batch = [link(span.get_span_context())]
        for item, trace in traced.items():
            if not trace.queued:
                trace.queued = True
                self._child(trace.context, "queue", wall(item.enqueued_at), start_ns,
                            {"bertstream.priority": item.priority})
            self._child(trace.context, "run", start_ns, end_ns,
                        {"bertstream.batch.size": len(lengths)}, to_batch, error)

    def _child(self, parent: Context, name: str, start_ns: int, end_ns: int,
               attributes: Mapping[str, Any] | None = None, links: Sequence[Any] = (),
               error: BaseException | None = None) -> int:
        """A finished child span of `parent` from start_ns to end_ns; returns end_ns."""
        assert self._tracer is not None
        span = self._tracer.start_span(name, context=parent, start_time=start_ns,
                                       attributes=attributes, links=links)
        if error is not None:
            self.fail(span, type(error).__name__)
        span.end(end_time=end_ns)
        return end_ns

    def fail(self, span: Span, description: str = "") -> None:
        """Mark a span as failed by the server (its status ERROR)."""
        span.set_status(self._api.Status(self._api.StatusCode.ERROR, description or None))


TRACE = Tracing()
