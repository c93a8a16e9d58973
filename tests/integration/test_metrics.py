"""The Prometheus endpoint of a real server: counts by model, version, rpc and status code,
latency histograms, batch sizes and padding, gauges."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元，市场普遍预期利好"]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(model_repository, "--metrics-port", "0")
    line = next(line for line in server.lines if line.startswith("bertstream metrics on "))
    port = int(line.rsplit(":", 1)[1])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        for _ in range(3):
            stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS), timeout=10)
        requests = [pb.ClassifyRequest(model="tiny-news", texts=TEXTS, request_id=str(i))
                    for i in range(4)]
        assert len(list(stub.ClassifyStream(iter(requests), timeout=30))) == 4
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[""]), timeout=10)
    samples = _scrape(port)
    ok = {"model": "tiny-embed", "version": "1", "rpc": "Embed", "code": "OK"}
    assert _value(samples, "bertstream_requests_total", **ok) == 3
    bad = {**ok, "version": "", "code": "INVALID_ARGUMENT"}
    assert _value(samples, "bertstream_requests_total", **bad) == 1
    stream = {"model": "tiny-news", "version": "1", "rpc": "ClassifyStream", "code": "OK"}
    assert _value(samples, "bertstream_requests_total", **stream) == 4
    assert _value(samples, "bertstream_texts_total", model="tiny-news", version="1",
                  rpc="ClassifyStream") == 8
    assert _value(samples, "bertstream_request_seconds_count", model="tiny-embed",
                  rpc="Embed") == 4
    version = {"model": "tiny-embed", "version": "1"}
    real = _value(samples, "bertstream_batch_tokens_total", **version, kind="real")
    padded = _value(samples, "bertstream_batch_tokens_total", **version, kind="padded")
    assert 0 < real <= padded, (real, padded)
    assert _value(samples, "bertstream_batch_size_count", **version) >= 3
    assert _value(samples, "bertstream_batch_size_sum", **version) >= 6 + 2  # + warm-up
    assert _value(samples, "bertstream_queue_seconds_count", **version) >= 6
    assert _value(samples, "bertstream_inference_seconds_count", **version) >= 3
    assert ("bertstream_queue_texts", tuple(sorted(version.items()))) in samples
    assert _value(samples, "bertstream_requests_in_flight", rpc="Embed") == 0
    assert server.stop() == 0
