"""What tools other than our stubs see: health, reflection, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def test_health_overall_and_per_model(channel) -> None:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "bertstream.v1.BertService", "inference.GRPCInferenceService",
                    "tiny-embed", "tiny-news"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(channel) -> None:  # type: ignore[no-untyped-def]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"bertstream.v1.BertService", "grpc.health.v1.Health"} <= names


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bertstream.client", *args,
                           "--server", address], capture_output=True, text=True, timeout=120)


def test_cli_embed_classify_tokenize_models(address: str) -> None:
    out = cli(address, "embed", "今天股市大涨，沪指收复三千点", "--model", "tiny-embed")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert len(row["embedding"]) == 64
    out = cli(address, "classify", "央行宣布降准，股市应声大涨", "--model", "tiny-news")
    assert [label["label"] for label in json.loads(out.stdout)[0]["labels"]].__len__() == 3
    out = cli(address, "tokenize", "你好，世界")
    assert json.loads(out.stdout)[0]["tokens"][:3] == ["[CLS]", "你", "好"]
    out = cli(address, "models")
    assert {(m["model"], m["state"]) for m in json.loads(out.stdout)} == {
        ("tiny-embed", "READY"), ("tiny-news", "READY")}


def test_cli_error_is_json_and_nonzero(address: str) -> None:
    out = cli(address, "embed", "x", "--model", "missing")
    assert out.returncode == 1
    assert json.loads(out.stderr)["error"]["code"] == "NOT_FOUND"
