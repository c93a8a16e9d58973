"""The gRPC port's connection limits (server/api/grpc_connections.py) with raw HTTP/2 on
loopback: a peer that pings too often is sent GOAWAY (too_many_pings) rather than answered
for ever, and one that opens a connection and never speaks is dropped after the handshake
timeout; normal calls go on meanwhile."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def strict(model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    server = start_server(model_repository, "--grpc-min-ping-interval", "5")
    yield server
    assert server.stop() == 0


def _frame(kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def _parse(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of the whole frames in `data`."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        frames.append((data[3], data[9:9 + length]))
        data = data[9 + length:]
    return frames


def _receive(sock: socket.socket, wait_s: float) -> bytes:
    """What the server sends within `wait_s`, or until it closes the connection."""
    deadline, data = time.monotonic() + wait_s, b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _embed(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.BertServiceStub(channel).Embed(pb.EmbedRequest(texts=["央行宣布降准"]),
                                                       timeout=30)
    assert len(reply.embeddings) == 1


def test_a_ping_flood_gets_goaway_too_many_pings(strict: ServerProcess) -> None:
    host, port = strict.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS))
        received = b""
        for i in range(20):
            try:
                sock.sendall(_frame(PING, struct.pack(">Q", i)))
            except (BrokenPipeError, ConnectionResetError):  # it already said goodbye
                break
            received += _receive(sock, 0.02)
        received += _receive(sock, 5)
        goaways = [payload for kind, payload in _parse(received) if kind == GOAWAY]
    assert goaways, "no GOAWAY for 20 pings in 0.4 s"
    error = struct.unpack(">I", goaways[-1][4:8])[0]
    assert error == ENHANCE_YOUR_CALM and b"too_many_pings" in goaways[-1][8:], goaways
    _embed(strict.address)  # everyone else is served


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
        strict: ServerProcess) -> None:
    host, port = strict.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        _receive(sock, 30)  # until the server closes it
        waited = time.monotonic() - started
    assert waited < 20, f"a connection that never sent the preface lived {waited:.0f} s"
    _embed(strict.address)


def test_a_stream_and_the_client_s_calls_go_on_across_connection_ageing(
        model_repository: Path, start_server: Callable[..., ServerProcess]) -> None:
    """With the default grace (none: calls in flight finish on the old connection), a stream
    that outlives several `--grpc-max-connection-age` periods answers every item once and in
    order, and the same BertClient's unary calls after each GOAWAY go out on a new connection
    without an error reaching the caller."""
    from bertstream.client import BertClient

    server = start_server(model_repository, "--grpc-max-connection-age", "1",
                          "--fake-device", "custom,a_ms=20,b_us=0")
    texts = [f"第{i}条新闻：央行宣布降准" for i in range(600)]
    started = time.perf_counter()
    with BertClient(server.address) as client:
        results = list(client.encode_stream(texts, window=8))
        streamed_s = time.perf_counter() - started
        calls = []
        for _ in range(6):  # spread over several ages
            call_started = time.perf_counter()
            assert client.encode("央行宣布降准").shape == (1, 64)
            calls.append(time.perf_counter() - call_started)
            time.sleep(0.5)
    assert streamed_s > 3, "the stream ended before its connection aged; slow the device"
    assert [r.index for r in results] == list(range(len(texts)))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert max(calls) < 5, calls
    assert server.stop() == 0
