"""A real server on the fake device with its stage clocks on: what bench.py relies on."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["央行宣布降准", "今天股市大涨，沪指收复三千点", "暴雨救援",
         "苹果发布iPhone 15，售价5999元"]


def _metrics(server: ServerProcess) -> dict[tuple[str, str], float]:
    line = next(line for line in server.lines if line.startswith("bertstream metrics on "))
    url = f"http://{line.split()[-1]}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = sample.labels.get("stage") or sample.labels.get("thread") or \
                sample.labels.get("model", "")
            found[(sample.name, label)] = sample.value
    return found


def test_fake_device_serves_every_caller_its_own_rows_and_the_clocks_count(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(model_repository, "--fake-device", "h100-e5-small-fp16,speed=0.5",
                          "--stage-timing", "--metrics-port", "0")
    assert "fake device" in "".join(server.lines)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        together = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS,
                                              raw_values=True), timeout=30)
        requests = [pb.EmbedRequest(model="tiny-embed", texts=[t], request_id=str(i),
                                    raw_values=True) for i, t in enumerate(TEXTS)]
        alone = list(stub.EmbedStream(iter(requests), timeout=30))
        labels = stub.Classify(pb.ClassifyRequest(model="tiny-news", texts=TEXTS, top_k=2),
                               timeout=30)
        info = stub.GetModel(pb.GetModelRequest(model="tiny-embed"), timeout=10)
    assert info.execution_provider == "FakeDevice"
    vectors = [np.frombuffer(e.raw, "<f4") for e in together.embeddings]
    assert [r.request_id for r in alone] == [str(i) for i in range(len(TEXTS))]
    for vector, response in zip(vectors, alone, strict=True):  # batch-invariant rows
        assert vector.shape == (64,)
        assert np.array_equal(vector, np.frombuffer(response.embeddings[0].raw, "<f4"))
    assert all(len(r.labels) == 2 and r.labels[0].probability >= r.labels[1].probability
               for r in labels.results)
    metrics = _metrics(server)
    for stage in ("decode", "validate", "tokenize_native", "batch", "pad", "device", "scatter",
                  "resolve", "respond", "encode"):
        assert metrics[("bertstream_stage_cpu_seconds_total", stage)] > 0, stage
    assert metrics[("bertstream_thread_cpu_seconds_total", "event-loop")] > 0
    assert metrics[("bertstream_thread_cpu_seconds_total", "tokenize")] > 0
    assert metrics[("bertstream_device_busy_seconds", "tiny-embed")] > 0


def test_without_stage_timing_no_stage_clock_is_exported(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(model_repository, "--metrics-port", "0")
    with grpc.insecure_channel(server.address) as channel:
        pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model="tiny-embed", texts=TEXTS), timeout=30)
    metrics = _metrics(server)
    assert not any(name == "bertstream_stage_cpu_seconds_total" for name, _ in metrics)
    assert metrics[("bertstream_thread_cpu_seconds_total", "event-loop")] > 0
    assert metrics[("bertstream_device_busy_seconds", "tiny-embed")] > 0


def test_a_bad_fake_device_spec_is_a_usage_error(model_repository: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bertstream.server", "--model-repository",
                           str(model_repository), "--fake-device", "h900-imaginary"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown fake device profile 'h900-imaginary'" in done.stderr
    assert "Traceback" not in done.stderr
