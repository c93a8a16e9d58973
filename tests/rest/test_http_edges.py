"""Callers that leave mid-upload and header values only `str.isdigit` likes: neither is a
server fault, so neither may reach the log as one or be answered 500."""

from __future__ import annotations

import socket
import time

from rest.conftest import HttpServer, call


def _raw(server: HttpServer, request: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536) if read else b""


def test_a_caller_that_leaves_mid_upload_is_not_a_server_fault(http_server: HttpServer) -> None:
    before = len(http_server.process.lines)
    for path in ("/v1/embeddings", "/embed", "/encode", "/v2/models/tiny-embed/infer"):
        _raw(http_server, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
             f"\r\nContent-Length: 100000\r\n\r\n{{\"input\": \"abc".encode(), read=False)
    time.sleep(0.5)
    status, _ = call(http_server.url + "/v1/models")
    assert status == 200
    log = "".join(http_server.process.lines[before:])
    assert "internal error" not in log and "Traceback" not in log


def test_a_non_ascii_digit_is_a_bad_request_not_a_fault(http_server: HttpServer) -> None:
    before = len(http_server.process.lines)
    reply = _raw(http_server, b"POST /v2/models/tiny-embed/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Inference-Header-Content-Length: \xb2\r\nContent-Length: 2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert "internal error" not in "".join(http_server.process.lines[before:])
