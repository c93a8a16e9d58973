"""OpenTelemetry traces (server/tracing.py) as a collector receives them: a real OTLP/gRPC
receiver (opentelemetry-proto's TraceService) runs in the test, a real server process exports
to it. The tree of a call and of a stream message across the front-end and engine processes,
the caller's trace continued, attributes, the batch span's links, and the sampling rate."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

trace_service_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2")
trace_service_pb2_grpc = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
pytest.importorskip("opentelemetry.sdk")

if TYPE_CHECKING:
    from conftest import ServerProcess

EMBED = "bertstream.v1.BertService/Embed"
EMBED_STREAM = "bertstream.v1.BertService/EmbedStream"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_ERROR = 2
WAIT_S = 30.0


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    process: str  # the resource's bertstream.process
    status: int
    start: int
    end: int


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """What a collector would store: every span of every Export, with its process."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = threading.Condition()

    def Export(self, request: Any, context: Any) -> Any:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(Span(
                        s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                        {kv.key: _value(kv.value) for kv in s.attributes},
                        tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        resource["bertstream.process"], s.status.code, s.start_time_unix_nano,
                        s.end_time_unix_nano))
        with self._changed:
            self.spans += received
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._changed:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        with self._changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what}: not within {WAIT_S:.0f} s; received "
                                         f"{sorted({s.name for s in self.spans})}")
                self._changed.wait(left)


@pytest.fixture
def start_receiver() -> Iterator[Callable[[], tuple[Receiver, str]]]:
    servers: list[grpc.Server] = []

    def start() -> tuple[Receiver, str]:
        receiver = Receiver()
        server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return receiver, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A caller's (trace id, span id, traceparent header)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def _only(spans: list[Span], name: str, parent: Span | None = None) -> Span:
    found = [s for s in spans if s.name == name and (parent is None or s.parent_id
                                                         == parent.span_id)]
    assert len(found) == 1, (name, found)
    return found[0]


def _check_request_tree(receiver: Receiver, request: Span, front_end: str,
                        engine: str) -> Span:
    """A request span's children: validate, tokenize, respond in the front end; queue and
    run in the engine; its batch's span links back to it. Returns the batch span."""
    spans = receiver.trace(request.trace_id)
    children = {s.name: s for s in spans if s.parent_id == request.span_id
                and s.name != "batch"}
    assert set(children) == {"validate", "tokenize", "queue", "run", "respond"}, children
    for name in ("validate", "tokenize", "respond"):
        assert children[name].process == front_end, children[name]
    for name in ("queue", "run"):
        assert children[name].process == engine, children[name]
    # One after the other (the engine's clock is the same machine's).
    validate, tokenize, queue, run, respond = (children[n] for n in (
        "validate", "tokenize", "queue", "run", "respond"))
    assert request.start <= validate.start <= validate.end <= tokenize.start
    assert tokenize.end <= queue.start + 5_000_000  # a hop to the engine: under 5 ms skew
    assert queue.end == run.start and run.end <= respond.start <= respond.end <= request.end
    assert tokenize.attributes["bertstream.tokens"] >= 2
    # The batch that carried it: linked from its run span, linking to every request in it.
    (batch_link,) = run.links
    batches = [s for s in receiver.spans if (s.trace_id, s.span_id) == batch_link]
    assert len(batches) == 1, batch_link
    batch = batches[0]
    assert batch.name == "batch" and batch.process == engine
    assert (request.trace_id, request.span_id) in batch.links
    assert (batch.start, batch.end) == (run.start, run.end)
    return batch


def _check_batch(batch: Span, texts: int) -> None:
    a = batch.attributes
    assert a["bertstream.model"] == "tiny-embed" and a["bertstream.version"] == 1
    assert a["bertstream.batch.size"] >= texts
    assert a["bertstream.batch.padded_tokens"] == (a["bertstream.batch.size"]
                                                   * a["bertstream.batch.padded_length"])
    assert a["bertstream.batch.tokens"] <= a["bertstream.batch.padded_tokens"]
    assert a["bertstream.batch.padding"] == pytest.approx(
        1 - a["bertstream.batch.tokens"] / a["bertstream.batch.padded_tokens"])


@pytest.fixture
def traced_frontends(model_repository: Path, start_server: Callable[..., ServerProcess],
                     start_receiver: Callable[[], tuple[Receiver, str]],
                     ) -> Iterator[tuple[ServerProcess, Receiver, int]]:
    """A `--frontends 2` server that traces every call."""
    receiver, endpoint = start_receiver()
    http_port = _free_port()
    server = start_server(model_repository, "--frontends", "2", "--http-port", str(http_port),
                          "--trace-endpoint", endpoint, "--trace-rate", "1")
    yield server, receiver, http_port
    assert server.stop() == 0, "".join(server.lines[-40:])
    assert "Traceback" not in "".join(server.lines), "".join(server.lines)


def test_a_call_and_a_stream_message_are_one_tree_across_processes(
        traced_frontends: tuple[ServerProcess, Receiver, int]) -> None:
    server, receiver, http_port = traced_frontends
    unary_trace, unary_parent, unary_header = _traceparent()
    stream_trace, stream_parent, stream_header = _traceparent()
    http_trace, http_parent, http_header = _traceparent()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        stub.Embed(pb.EmbedRequest(texts=["今天天气很好", "央行宣布降准"]),
                   metadata=[("traceparent", unary_header)])
        answers = list(stub.EmbedStream(iter([
            pb.EmbedRequest(texts=["股市大涨"], request_id="m1"),
            pb.EmbedRequest(texts=["暴雨", "苹果发布新手机"], request_id="m2"),
        ]), metadata=[("traceparent", stream_header)]))
        assert [a.request_id for a in answers] == ["m1", "m2"]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(texts=[]), metadata=[("traceparent", unary_header)])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    http = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/embed", json.dumps({"inputs": ["新闻"]}).encode(),
        {"content-type": "application/json", "traceparent": http_header})
    with urllib.request.urlopen(http, timeout=30) as response:
        assert response.status == 200

    def complete(trace_id: str, requests: int) -> bool:
        spans = receiver.trace(trace_id)
        return (sum(s.name == "respond" for s in spans) >= requests
                and sum(s.name == "run" for s in spans) >= requests
                and sum(s.kind == SERVER_KIND for s in spans) >= requests)

    receiver.wait_for(lambda: complete(unary_trace, 1) and complete(stream_trace, 2)
                      and complete(http_trace, 1), "every span of the four requests")

    # The unary call: the caller's trace continued, one tree over two processes.
    spans = receiver.trace(unary_trace)
    calls = [s for s in spans if s.name == EMBED]
    assert len(calls) == 2 and all(s.parent_id == unary_parent for s in calls)
    (call,) = [s for s in calls if s.attributes["rpc.grpc.status_code"] == 0]
    (refusal,) = [s for s in calls if s is not call]
    assert refusal.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refusal.status != STATUS_ERROR  # the caller's fault, not the server's
    assert not [s for s in spans if s.parent_id == refusal.span_id]
    assert call.kind == SERVER_KIND and call.process.startswith("frontend-")
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.method"] == "Embed"
    assert call.attributes["bertstream.model"] == "tiny-embed"
    assert call.attributes["bertstream.version"] == 1
    assert call.attributes["bertstream.texts"] == 2
    _check_batch(_check_request_tree(receiver, call, call.process, "engine"), texts=2)

    # Each stream message: a span of its own under the caller's context, its own tree.
    messages = sorted((s for s in receiver.trace(stream_trace) if s.name == EMBED_STREAM),
                      key=lambda s: s.attributes["bertstream.stream.message"])
    assert [m.attributes["bertstream.request_id"] for m in messages] == ["m1", "m2"]
    assert [m.attributes["bertstream.stream.message"] for m in messages] == [1, 2]
    for message, texts in zip(messages, (1, 2), strict=True):
        assert message.parent_id == stream_parent and message.kind == SERVER_KIND
        assert message.process.startswith("frontend-")
        assert message.attributes["bertstream.texts"] == texts
        _check_batch(_check_request_tree(receiver, message, message.process, "engine"), texts)

    # An HTTP request (TEI's dialect) continues the caller's traceparent header too.
    (request,) = [s for s in receiver.trace(http_trace) if s.kind == SERVER_KIND]
    assert request.name == "POST tei:Embed" and request.parent_id == http_parent
    assert request.attributes["http.response.status_code"] == 200
    _check_request_tree(receiver, request, request.process, "engine")


def _binomial_bounds(n: int, p: float, tail: float = 1e-6) -> tuple[int, int]:
    """The counts outside which a Binomial(n, p) falls with probability under `tail` per side."""
    pmf = [math.comb(n, k) * p**k * (1 - p)**(n - k) for k in range(n + 1)]
    low = next(k for k in range(n + 1) if sum(pmf[:k + 1]) >= tail)
    high = next(k for k in range(n, -1, -1) if sum(pmf[k:]) >= tail)
    return low, high


def test_sampling_rate_and_callers_decisions(
        model_repository: Path, start_server: Callable[..., ServerProcess],
        start_receiver: Callable[[], tuple[Receiver, str]]) -> None:
    """--trace-rate 0.25 on the one-process server: about a quarter of the calls that bring
    no traceparent, every call whose caller sampled, none whose caller did not; spans still
    queued are sent when the server stops."""
    receiver, endpoint = start_receiver()
    server = start_server(model_repository, "--trace-endpoint", endpoint,
                          "--trace-rate", "0.25")
    calls = 200
    sampled = [_traceparent() for _ in range(20)]
    unsampled = [_traceparent(sampled=False) for _ in range(20)]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        for i in range(calls):
            stub.Embed(pb.EmbedRequest(texts=[f"第{i}条新闻"]))
        for _, _, header in sampled + unsampled:
            stub.Embed(pb.EmbedRequest(texts=["新闻"]), metadata=[("traceparent", header)])
    assert server.stop() == 0, "".join(server.lines[-40:])
    assert "Traceback" not in "".join(server.lines), "".join(server.lines)

    requests = [s for s in receiver.spans if s.name == EMBED]
    assert {s.process for s in receiver.spans} == {"server"}
    roots = [s for s in requests if not s.parent_id]
    low, high = _binomial_bounds(calls, 0.25)
    assert low <= len(roots) <= high, (len(roots), low, high)
    assert len({s.trace_id for s in roots}) == len(roots)
    continued = {(s.trace_id, s.parent_id) for s in requests if s.parent_id}
    assert continued == {(t, p) for t, p, _ in sampled}
    # Every traced call has its whole tree, the engine's spans in this same process.
    for request in requests:
        names = sorted(s.name for s in receiver.trace(request.trace_id)
                       if s.parent_id == request.span_id and s.name != "batch")
        assert names == ["queue", "respond", "run", "tokenize", "validate"], names
