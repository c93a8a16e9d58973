"""The HTTP port sheds stuck and greedy connections within its limits (server/api/http/
connections.py, common.read_body), with real sockets on loopback against a real server:
a half-sent request head, a body that stops, more connections than the cap; normal calls keep
working meanwhile, and the server's open files come back to where they were."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rest.conftest import HttpServer, call, start_http

if TYPE_CHECKING:
    from conftest import ServerProcess

HEAD_S, BODY_S, CAP = 1.0, 1.0, 12


@pytest.fixture(scope="module")
def limited(model_repository: Path,
            start_server: Callable[..., ServerProcess]) -> Iterator[HttpServer]:
    server = start_http(start_server, model_repository, "--http-header-timeout", str(HEAD_S),
                        "--http-body-timeout", str(BODY_S),
                        "--http-max-connections", str(CAP))
    yield server
    assert server.process.stop() == 0
    assert "Traceback" not in "".join(server.process.lines)


def _open_files(server: HttpServer) -> int:
    return len(os.listdir(f"/proc/{server.process.proc.pid}/fd"))


def _connect(server: HttpServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (fails past `within_s`)."""
    sock.settimeout(within_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """One request on a keep-alive connection and its whole response (by Content-Length)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _embed_ok(server: HttpServer) -> None:
    status, body = call(f"{server.url}/v1/embeddings", {"input": ["央行宣布降准"],
                                                        "model": "tiny-embed"})
    assert status == 200, body


def _settle_files(server: HttpServer, baseline: int) -> int:
    for _ in range(50):
        now = _open_files(server)
        if now <= baseline:
            return now
        time.sleep(0.1)
    return _open_files(server)


def test_half_sent_heads_get_408_and_close_within_the_head_timeout(limited: HttpServer) -> None:
    _embed_ok(limited)
    baseline = _open_files(limited)
    slow = [_connect(limited) for _ in range(CAP - 2)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Ty")
    _embed_ok(limited)  # a normal caller is served while they hang
    for sock in slow:
        answer = _read_all(sock, within_s=HEAD_S + 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        sock.close()
    assert time.monotonic() - started < HEAD_S + 5
    assert _settle_files(limited, baseline) <= baseline


def test_an_idle_connection_that_never_sends_is_closed_too(limited: HttpServer) -> None:
    sock = _connect(limited)
    answer = _read_all(sock, within_s=HEAD_S + 5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    sock.close()


def test_a_body_that_stops_arriving_gets_408_in_the_dialects_shape(limited: HttpServer) -> None:
    baseline = _open_files(limited)
    sock = _connect(limited)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 100\r\n\r\n{\"input\": ")
    started = time.monotonic()
    answer = _read_all(sock, within_s=BODY_S + 5)
    assert time.monotonic() - started < BODY_S + 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert b"the request body stopped arriving" in body and b'"error"' in body  # OpenAI's
    sock.close()
    _embed_ok(limited)
    assert _settle_files(limited, baseline) <= baseline


def test_connections_over_the_cap_get_503_at_once_and_open_ones_keep_working(
        limited: HttpServer) -> None:
    baseline = _open_files(limited)
    keeper = _connect(limited)  # an established keep-alive caller, before the flood
    request = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _exchange(keeper, request).startswith(b"HTTP/1.1 200 ")
    flood = [_connect(limited) for _ in range(CAP + 8)]
    # Every flooding socket is answered: 503 at once past the cap, 408 after the head timeout
    # for those admitted (they never send a head).
    answers = [_read_all(sock, within_s=HEAD_S + 10) for sock in flood]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) >= 8, [a[:12] for a in answers]
    for answer in refused:
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"retry-after: 1" in head and b"connection: close" in head, answer[:120]
    assert all(a.startswith((b"HTTP/1.1 503 ", b"HTTP/1.1 408 ")) for a in answers)
    # The open connection is still served (its keep-alive idle limit is 15 s).
    assert _exchange(keeper, request).startswith(b"HTTP/1.1 200 ")
    for sock in flood:
        sock.close()
    keeper.close()
    assert _settle_files(limited, baseline) <= baseline
    _embed_ok(limited)  # and new connections are taken again


def test_tei_health_answers_200_while_the_model_serves(limited: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = _read_all(sock, within_s=10)
    assert answer.startswith(b"HTTP/1.1 200 ")
    status, body = call(f"{limited.url}/tei/no-such-model/health")
    assert status == 404 and body["error_type"], body
