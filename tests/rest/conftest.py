"""A real bertstream-server with HTTP on a free loopback port, beside its gRPC port, over the
session's repository (tiny-embed, tiny-news). Every dialect's tests share it."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HttpServer:
    process: ServerProcess
    http_port: int

    @property
    def address(self) -> str:  # gRPC
        return self.process.address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_http(start_server: Callable[..., ServerProcess], repository: Path,
               *flags: str) -> HttpServer:
    port = free_port()
    return HttpServer(start_server(repository, "--http-port", str(port), *flags), port)


# Every dialect's test on the shared HTTP server runs on both CPU engines.
@pytest.fixture(scope="session", params=["onnxruntime", "openvino"])
def http_server(request: pytest.FixtureRequest, model_repository: Path,
                start_server: Callable[..., ServerProcess]) -> Iterator[HttpServer]:
    repository = model_repository
    if request.param == "openvino":
        repository = request.getfixturevalue("openvino_model_repository")
    server = start_http(start_server, repository)
    yield server
    code = server.process.stop()
    assert code == 0, "".join(server.process.lines[-40:])
    assert "Traceback" not in "".join(server.process.lines), "".join(server.process.lines)


def call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a POST (a GET when there is no body)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def grpc_embed(address: str, texts: list[str], model: str = "tiny-embed",
               **fields: object) -> np.ndarray:
    """The vectors gRPC Embed answers for the same texts: what every dialect must equal."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model=model, texts=texts, **fields), timeout=30)
    return np.array([list(v.values) for v in reply.embeddings], dtype=np.float32)


def grpc_classify(address: str, texts: list[str], model: str = "tiny-news") -> list[str]:
    """The top label gRPC Classify answers for each text."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.BertServiceStub(channel).Classify(
            pb.ClassifyRequest(model=model, texts=texts), timeout=30)
    return [r.labels[0].label for r in reply.results]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)
