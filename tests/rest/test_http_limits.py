"""HTTP's limits and refusals on real servers: a body over `--max-receive-mb` (413, from its
Content-Length before it is read, and part-way through a chunked body), too many texts (400
naming the limit), a full queue (429), the SIGTERM drain (503 while a running request still
ends 200), tokens (401, 403) and TLS (HTTPS only; mutual TLS wants a client certificate).

The servers run a fake device (server/engine/backends/fake.py: batches sleep, nothing
computes) where a slow batch is what a test needs; their vectors are made up, which none of
these tests reads.
"""

from __future__ import annotations

import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import pytest
from rest.conftest import HttpServer, start_http

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "security") not in sys.path:
    sys.path.insert(0, str(TESTS / "security"))

from certlib import Pki, make_pki  # noqa: E402

if TYPE_CHECKING:
    from conftest import ServerProcess

MiB = 1024 * 1024
MAX_TEXTS = 4
QUEUE = 4  # texts: room for one request of MAX_TEXTS while a batch runs
INFERENCE_TOKEN = "tinference-" + "x" * 20
ADMIN_TOKEN = "tadmin-" + "y" * 20
EMBED = {"model": "tiny-embed", "input": ["股市", "央行"], "encoding_format": "float"}


def _slow_repository(model_repository: Path, destination: Path) -> Path:
    """tiny-embed alone, with a queue of QUEUE texts."""
    import shutil

    shutil.copytree(model_repository / "tiny-embed", destination / "tiny-embed")
    config = destination / "tiny-embed" / "config.pbtxt"
    text = config.read_text("utf-8")
    assert "dynamic_batching {\n}" in text
    config.write_text(text.replace("dynamic_batching {\n}",
                                   f"dynamic_batching {{\n  max_queue_size: {QUEUE}\n}}"), "utf-8")
    return destination


def _assert_clean_log(server: HttpServer, *secrets: str) -> None:
    log = "".join(server.process.lines)
    assert "Traceback" not in log, log[-4000:]
    for secret in secrets:
        assert secret not in log


@pytest.fixture(scope="module")
def limited(model_repository: Path, start_server: Callable[..., ServerProcess],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """1 MiB bodies, 4 texts a request, a 200 ms batch, a queue of 4 texts, tokens."""
    folder = tmp_path_factory.mktemp("http-limits")
    tokens = folder / "tokens"
    tokens.write_text(f"inference:{INFERENCE_TOKEN}\nadmin:{ADMIN_TOKEN}\n", "utf-8")
    server = start_http(start_server, _slow_repository(model_repository, folder / "repo"),
                        "--max-receive-mb", "1", "--max-texts-per-request", str(MAX_TEXTS),
                        "--fake-device", "custom,a_ms=200,b_us=0", "--frontends", "1",
                        "--auth-token-file", str(tokens))
    yield server
    assert server.process.stop() == 0
    _assert_clean_log(server, INFERENCE_TOKEN, ADMIN_TOKEN)


def _client(server: HttpServer, token: str | None = INFERENCE_TOKEN) -> httpx2.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.Client(base_url=server.url, headers=headers, timeout=30)


def _raw(server: HttpServer, head: str) -> socket.socket:
    """A connection that has sent `head` (request line and headers, the token added)."""
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    sock.sendall((f"{head}Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {INFERENCE_TOKEN}\r\n\r\n").encode())
    return sock


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the response on `sock` (it has a Content-Length)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += _recv(sock)
    head, body = received.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += _recv(sock)
    assert head.startswith(b"HTTP/1.1 "), head
    return int(head.split(b" ", 2)[1]), body


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection"
    return data


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
        limited: HttpServer) -> None:
    """10 GiB announced, nothing sent: the 413 comes at once, so nothing was waited for."""
    with _raw(limited, "POST /v1/embeddings HTTP/1.1\r\nContent-Length: 10737418240\r\n") as sock:
        started = time.monotonic()
        status, reply = _reply(sock)
    assert status == 413 and time.monotonic() - started < 5
    assert b"10737418240 bytes, over the limit of 1048576" in reply
    with _client(limited) as client:
        body = b'{"input": "' + b"a" * (2 * MiB) + b'"}'
        refused = client.post("/v1/embeddings", content=body)
        assert refused.status_code == 413
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200  # same connection


def test_a_chunked_body_is_refused_part_way(limited: HttpServer) -> None:
    """64 MiB in 64 KiB chunks: the 413 arrives while the client is still sending, a few
    socket buffers past the 1 MiB limit, not after the server read it all."""
    total, chunk = 64 * MiB, 64 * 1024
    frame = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
    sent = 0
    with _raw(limited, "POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n") as sock:
        deadline = time.monotonic() + 30
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                sent += sock.send(frame[sent % len(frame):])  # whole frames, resumed
        status, reply = _reply(sock)
    assert status == 413 and b"over the limit of 1048576 bytes" in reply
    assert sent < total // 4, f"the reply came after {sent} of {total} bytes"


def test_httpx_streaming_a_chunked_body_gets_413(limited: HttpServer) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"input": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    with _client(limited) as client:
        refused = client.post("/v1/embeddings", content=body())
    assert refused.status_code == 413
    assert "over the limit of 1048576 bytes" in refused.json()["error"]["message"]


def test_too_many_texts_names_the_limit(limited: HttpServer) -> None:
    with _client(limited) as client:
        reply = client.post("/v1/embeddings", json={**EMBED, "input": ["股市"] * (MAX_TEXTS + 1)})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "5 texts in one message, over the limit of 4"


def test_a_full_queue_is_429(limited: HttpServer) -> None:
    """Eight requests of four texts at once, one 200 ms batch at a time, room for four texts
    waiting: the ones that find the queue full are refused at once (HTTP never waits for
    room, as unary gRPC does not); the rest are answered."""
    body = {**EMBED, "input": [f"文本{i}" for i in range(MAX_TEXTS)]}
    with _client(limited) as client, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: client.post("/v1/embeddings", json=body), range(8)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"  # when to come back
    full = refused.json()["error"]
    assert full["type"] == "rate_limit_error" and "queue full" in full["message"]


def test_tokens_on_inference(limited: HttpServer) -> None:
    for token in (None, "not-a-token", INFERENCE_TOKEN[:-1]):
        with _client(limited, token) as client:
            for reply in (client.post("/v1/embeddings", json=EMBED), client.get("/v1/models")):
                assert reply.status_code == 401, reply.text
                assert reply.json()["error"]["type"] == "authentication_error"
    with httpx2.Client(base_url=limited.url, timeout=30) as client:
        for value in (f"Basic {INFERENCE_TOKEN}", "Bearer", INFERENCE_TOKEN):
            reply = client.post("/v1/embeddings", json=EMBED, headers={"authorization": value})
            assert reply.status_code == 401
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN):
        with _client(limited, token) as client:
            assert client.post("/v1/embeddings", json=EMBED).status_code == 200


def test_admin_endpoints_need_the_admin_scope(limited: HttpServer) -> None:
    with _client(limited, ADMIN_TOKEN) as client:
        reply = client.post("/v2/repository/index", json={})
    if reply.status_code == 404 and reply.text == "Not Found":  # Starlette's: no such route
        pytest.skip("KServe's /v2/repository routes are not there yet (server/api/http/kserve.py): "
                    "only the inference scope is tested")
    assert reply.status_code == 200, reply.text
    for token, status in ((None, 401), ("not-a-token", 401), (INFERENCE_TOKEN, 403)):
        with _client(limited, token) as client:
            refused = client.post("/v2/repository/index", json={})
        assert refused.status_code == status, refused.text


def test_sigterm_drains_http(model_repository: Path, tmp_path: Path,
                             start_server: Callable[..., ServerProcess]) -> None:
    """A request in flight when SIGTERM comes ends 200; requests that come after it get 503
    (send them elsewhere); then the server exits cleanly. One model: start-up warms it with
    two of these slow batches."""
    server = start_http(start_server, _slow_repository(model_repository, tmp_path),
                        "--fake-device", "custom,a_ms=1200,b_us=0", "--frontends", "1")
    slow: dict[str, httpx2.Response] = {}

    def in_flight() -> None:
        slow["reply"] = httpx2.post(server.url + "/v1/embeddings", json=EMBED, timeout=30)

    with httpx2.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/v1/models").status_code == 200  # connected before the signal
        running = threading.Thread(target=in_flight)
        running.start()
        time.sleep(0.3)  # the slow request is in its 1.2 s batch
        server.process.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while (probe := client.get("/v1/models")).status_code == 200:
            assert time.monotonic() < deadline, "never refused after SIGTERM"
            time.sleep(0.02)  # until the server has seen the signal
        assert probe.status_code == 503
        refused = client.post("/v1/embeddings", json=EMBED)
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        # Come back later, elsewhere: and not on this connection.
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        with httpx2.Client(base_url=server.url, timeout=10) as fresh:  # a new connection too
            assert fresh.post("/v1/embeddings", json=EMBED).status_code == 503
        assert running.is_alive()
        running.join(30)
    assert slow["reply"].status_code == 200 and len(slow["reply"].json()["data"]) == 2
    assert server.process.proc.wait(30) == 0
    _assert_clean_log(server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("http-pki"))


def _tls(pki: Pki, ca: Path | None = None, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca.cert))
    if client:
        context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


def test_https_with_the_grpc_tls_files(pki: Pki, model_repository: Path,
                                       start_server: Callable[..., ServerProcess]) -> None:
    server = start_http(start_server, model_repository, "--tls-cert", str(pki.server.cert),
                        "--tls-key", str(pki.server.key))
    secure = f"https://127.0.0.1:{server.http_port}"
    with httpx2.Client(verify=_tls(pki), timeout=10) as client:
        reply = client.post(secure + "/v1/embeddings", json=EMBED)
        assert reply.status_code == 200 and len(reply.json()["data"]) == 2
        localhost = client.get(f"https://localhost:{server.http_port}/v1/models")
        assert localhost.status_code == 200
    with pytest.raises(httpx2.TransportError):  # plaintext to the TLS port
        httpx2.post(server.url + "/v1/embeddings", json=EMBED, timeout=10)
    with pytest.raises(httpx2.ConnectError):  # a CA that did not sign the server's certificate
        httpx2.post(secure + "/v1/embeddings", json=EMBED, timeout=10,
                    verify=_tls(pki, ca=pki.rogue_client.cert))
    assert server.process.stop() == 0
    _assert_clean_log(server)


def test_mutual_tls_wants_a_client_certificate(pki: Pki, model_repository: Path,
                                               start_server: Callable[..., ServerProcess]
                                               ) -> None:
    server = start_http(start_server, model_repository, "--tls-cert", str(pki.server.cert),
                        "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.cert))
    secure = f"https://127.0.0.1:{server.http_port}"
    with httpx2.Client(verify=_tls(pki, client=True), timeout=10) as client:
        assert client.post(secure + "/v1/embeddings", json=EMBED).status_code == 200
    rogue = _tls(pki)
    rogue.load_cert_chain(pki.rogue_client.cert, pki.rogue_client.key)
    for what, context in (("no certificate", _tls(pki)), ("a rogue CA's", rogue)):
        with pytest.raises(httpx2.TransportError):
            httpx2.post(secure + "/v1/embeddings", json=EMBED, timeout=10, verify=context)
            pytest.fail(f"{what}: answered")
    with pytest.raises(httpx2.TransportError):
        httpx2.post(server.url + "/v1/embeddings", json=EMBED, timeout=10)
    assert server.process.stop() == 0
    _assert_clean_log(server)
