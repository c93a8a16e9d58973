"""Prometheus metrics (`prometheus_client`), served on `--metrics-port` at /metrics.

What an operator of a batching server needs to see, with Triton-like meanings:
- `bertstream_requests_total{model,version,rpc,code}`: every unary call and every stream
  message, by its gRPC status; `bertstream_texts_total{model,version,rpc}` counts the texts;
- `bertstream_request_seconds{model,rpc}`: end to end inside the server (tokenize, queue,
  inference, reply); `bertstream_queue_seconds` and `bertstream_inference_seconds{model,
  version}` per text and per batch;
- `bertstream_batch_size{model,version}` and `bertstream_batch_tokens_total{model,version,kind}`
  with kind `real` or `padded`: real / padded is the padding efficiency of the batcher;
- `bertstream_requests_in_flight{rpc}` and `bertstream_queue_texts{model,version}` gauges,
  `bertstream_queue_level_texts{model,version,priority}` by priority level;
- `bertstream_batch_cost_fixed_seconds` and `bertstream_batch_cost_token_seconds{model,
  version}`: the cost model the version measured at warm-up (seconds = fixed + token x padded
  tokens), which sizes its batches.

One `Metrics` object per server, on its own registry (tests start several servers in one
process without their metrics mixing).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import to_status
from .stages import CLOCK, StageCollector, ThreadCpuCollector

__all__ = ["Metrics", "RequestRecord"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
MAX_MODEL_LABELS = 256
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class RequestRecord:
    """Filled in by the handler once it knows which model and version served the call."""

    model: str = ""
    version: int = 0
    texts: int = 0

    def served(self, model: str, version: int, texts: int = 0) -> None:
        """The version that answered, and how many texts it answered (0: not a text call)."""
        self.model, self.version, self.texts = model, version, texts


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._model_labels: set[str] = set()
        self._children: dict[tuple[object, ...], Any] = {}
        self._levels: dict[tuple[str, int], int] = {}  # priority levels gauged per version
        r = self.registry
        self.requests = Counter("bertstream_requests", "Unary calls and stream messages",
                                ["model", "version", "rpc", "code"], registry=r)
        self.texts = Counter("bertstream_texts", "Texts answered",
                             ["model", "version", "rpc"], registry=r)
        self.request_seconds = Histogram(
            "bertstream_request_seconds", "Time inside the server per call or stream message",
            ["model", "rpc"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "bertstream_queue_seconds", "Time a text waited for its batch",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "bertstream_inference_seconds", "onnxruntime time per batch",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bertstream_batch_size", "Texts per batch",
                                    ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tokens = Counter(
            "bertstream_batch_tokens", "Tokens sent to the model: real, and padded (real + pad)",
            ["model", "version", "kind"], registry=r)
        self.in_flight = Gauge("bertstream_requests_in_flight", "Calls and stream messages "
                               "being answered", ["rpc"], registry=r)
        self.queued = Gauge("bertstream_queue_texts", "Texts waiting for a batch",
                            ["model", "version"], registry=r)
        self.queued_level = Gauge("bertstream_queue_level_texts",
                                  "Texts waiting for a batch, by priority level (1 highest)",
                                  ["model", "version", "priority"], registry=r)
        self.cost_fixed = Gauge("bertstream_batch_cost_fixed_seconds",
                                "Measured cost model: seconds a batch costs whatever its size",
                                ["model", "version"], registry=r)
        self.cost_token = Gauge("bertstream_batch_cost_token_seconds",
                                "Measured cost model: seconds each padded token adds to a batch",
                                ["model", "version"], registry=r)
        self.device_busy = Gauge(
            "bertstream_device_busy_seconds", "Seconds at least one batch of this version was "
            "running (grows like a counter; its rate is the device's busy share)",
            ["model", "version"], registry=r)
        self.load_failures = Counter(
            "bertstream_version_load_failures", "Model versions that failed to load (the "
            "reason is in the log and the version's status)", ["model"], registry=r)
        # Where a text's CPU goes (stages.py): per thread always, per stage with --stage-timing.
        r.register(ThreadCpuCollector())
        r.register(StageCollector(CLOCK))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on a thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    @contextlib.contextmanager
    def request(self, rpc: str, model_hint: str) -> Iterator[RequestRecord]:
        """Count one call or stream message with its status code and time."""
        record = RequestRecord(model=model_hint)
        gauge = self._child(self.in_flight, rpc)
        gauge.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield record
        except BaseException as exc:
            code = to_status(exc)[0] if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
            raise
        finally:
            gauge.dec()
            model, version = self._model_label(record.model), str(record.version or "")
            self._child(self.requests, model, version, rpc, code.name).inc()
            self._child(self.request_seconds, model, rpc).observe(time.perf_counter() - start)
            if code is grpc.StatusCode.OK and record.texts:
                self._child(self.texts, model, version, rpc).inc(record.texts)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client checks and locks on every
        `labels` call, four times per stream message. Bounded like the label values are
        (model names past MAX_MODEL_LABELS count as "other")."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model_label(self, name: str) -> str:
        """The model label of a call: the name a caller sent until it resolves, so a caller
        sending random names could grow the label set without end; past MAX_MODEL_LABELS
        distinct names the rest count as "other"."""
        name = name or "default"
        if name not in self._model_labels:
            if len(self._model_labels) >= MAX_MODEL_LABELS:
                return "other"
            self._model_labels.add(name)
        return name

    def batch_observer(self, model: str, version: int) -> Callable[..., None]:
        """What a version's batcher calls after each batch."""
        labels = (model, str(version))
        size, queue = self.batch_size.labels(*labels), self.queue_seconds.labels(*labels)
        inference = self.inference_seconds.labels(*labels)
        real = self.batch_tokens.labels(*labels, "real")
        padded = self.batch_tokens.labels(*labels, "padded")

        def observe(queue_s: Sequence[float], real_tokens: int, padded_tokens: int,
                    infer_s: float) -> None:
            size.observe(len(queue_s))
            for seconds in queue_s:
                queue.observe(seconds)
            inference.observe(infer_s)
            real.inc(real_tokens)
            padded.inc(padded_tokens)

        return observe

    def watch_queue(self, model: str, version: int, depth: Callable[[], float]) -> None:
        self.queued.labels(model, str(version)).set_function(depth)

    def watch_device(self, model: str, version: int, busy: Callable[[], float]) -> None:
        self.device_busy.labels(model, str(version)).set_function(busy)

    def watch_levels(self, model: str, version: int, levels: int,
                     depth: Callable[[int], float]) -> None:
        for level in range(1, levels + 1):
            self.queued_level.labels(model, str(version), str(level)).set_function(
                lambda level=level: depth(level))
        self._levels[(model, version)] = levels

    def show_cost(self, model: str, version: int, cost: Any) -> None:
        self.cost_fixed.labels(model, str(version)).set(cost.a_s)
        self.cost_token.labels(model, str(version)).set(cost.b_s)

    def forget(self, model: str, version: int) -> None:
        """A released version's gauges go (its counters stay: they are history)."""
        for gauge in (self.queued, self.device_busy, self.cost_fixed, self.cost_token):
            with contextlib.suppress(KeyError):
                gauge.remove(model, str(version))
        for level in range(1, self._levels.pop((model, version), 0) + 1):
            with contextlib.suppress(KeyError):
                self.queued_level.remove(model, str(version), str(level))
