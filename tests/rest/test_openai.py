"""The official `openai` client against `/v1/embeddings` and `/v1/models`: what retrieval
frameworks do when pointed at bertstream with `base_url`. Vectors must equal gRPC Embed's
(normalized), in both encodings, including the client's default, which asks base64 behind the
caller's back and decodes it."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import numpy as np
import openai
import pytest
from rest.conftest import HttpServer, cosine, grpc_embed, start_http

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元", "天气"]
INFERENCE_TOKEN = "t" + secrets.token_urlsafe(24)
ADMIN_TOKEN = "t" + secrets.token_urlsafe(24)


class Recorder:
    """The JSON bodies the client sent (an httpx2 event hook)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> None:
        self.sent.append(json.loads(request.read()))


def _client(url: str, api_key: str = "x", recorder: Recorder | None = None) -> openai.OpenAI:
    hooks = {"request": [recorder]} if recorder else {}
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30,
                         http_client=httpx2.Client(event_hooks=hooks))


def _assert_equal_to_grpc(vectors: np.ndarray, address: str, texts: list[str]) -> None:
    assert vectors.shape == (len(texts), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosine(vectors, grpc_embed(address, texts)).min() >= 0.9999


@pytest.fixture(scope="module")
def client(http_server: HttpServer) -> Iterator[openai.OpenAI]:
    with _client(http_server.url) as opened:
        yield opened


def test_a_string_and_a_list_in_floats(http_server: HttpServer, client: openai.OpenAI) -> None:
    one = client.embeddings.create(model="tiny-embed", input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].index == 0 and one.model == "tiny-embed"
    _assert_equal_to_grpc(np.array([one.data[0].embedding], np.float32), http_server.address,
                          TEXTS[:1])
    assert one.usage.prompt_tokens == one.usage.total_tokens > 0
    many = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="float",
                                    user="someone")  # accepted and ignored
    assert [d.index for d in many.data] == [0, 1, 2]
    _assert_equal_to_grpc(np.array([d.embedding for d in many.data], np.float32),
                          http_server.address, TEXTS)
    assert many.usage.total_tokens > one.usage.total_tokens


def test_explicit_base64_is_little_endian_float32(http_server: HttpServer,
                                                  client: openai.OpenAI) -> None:
    """Asked for explicitly, the client hands base64 back undecoded (its own rule)."""
    reply = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="base64")
    encoded = [d.embedding for d in reply.data]
    assert all(isinstance(e, str) for e in encoded)
    vectors = np.stack([np.frombuffer(base64.b64decode(e), "<f4") for e in encoded])  # type: ignore[arg-type]
    _assert_equal_to_grpc(vectors, http_server.address, TEXTS)


def test_the_default_asks_base64_and_decodes_it(http_server: HttpServer) -> None:
    recorder = Recorder()
    with _client(http_server.url, recorder=recorder) as recorded:
        reply = recorded.embeddings.create(model="tiny-embed", input=TEXTS)
    [sent] = recorder.sent
    assert sent["encoding_format"] == "base64" and sent["input"] == TEXTS  # not asked for
    vectors = np.array([d.embedding for d in reply.data], np.float32)
    assert all(isinstance(d.embedding, list) for d in reply.data)
    _assert_equal_to_grpc(vectors, http_server.address, TEXTS)


def test_models_lists_the_ready_models(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"tiny-embed", "tiny-news"}
    assert listed["tiny-embed"].object == "model" and listed["tiny-embed"].owned_by == "bertstream"


def test_errors_come_back_as_the_clients_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="股市", encoding_format="float")
    assert "no-such-model" in missing.value.message
    assert missing.value.body["type"] == "not_found_error"  # type: ignore[index]
    for empty in ([], ""):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="tiny-embed", input=empty, encoding_format="float")
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="tiny-embed", input=[[1, 2, 3]], encoding_format="float")
    assert "token arrays" in tokens.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-embed", input="股市",
                                 encoding_format="int8")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secured(model_repository: Path, start_server: Callable[..., ServerProcess],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    tokens = tmp_path_factory.mktemp("openai-auth") / "tokens"
    tokens.write_text(f"inference:{INFERENCE_TOKEN}\nadmin:{ADMIN_TOKEN}\n", encoding="utf-8")
    server = start_http(start_server, model_repository, "--auth-token-file", str(tokens))
    yield server
    assert server.process.stop() == 0
    log = "".join(server.process.lines)
    assert "Traceback" not in log
    for token in (INFERENCE_TOKEN, ADMIN_TOKEN, "not-a-token"):
        assert token not in log


def test_tokens_through_the_client(secured: HttpServer, http_server: HttpServer) -> None:
    with _client(secured.url) as keyless:  # the client's way to send no Authorization header
        with pytest.raises(openai.AuthenticationError) as failed:
            keyless.embeddings.create(model="tiny-embed", input=TEXTS,
                                      extra_headers={"Authorization": openai.Omit()})
        assert failed.value.status_code == 401 and "missing authorization" in str(failed.value)
    for key in ("not-a-token", INFERENCE_TOKEN[:-1]):
        with _client(secured.url, api_key=key) as refused:
            with pytest.raises(openai.AuthenticationError) as failed:
                refused.embeddings.create(model="tiny-embed", input=TEXTS)
            assert failed.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                refused.models.list()
    for key in (INFERENCE_TOKEN, ADMIN_TOKEN):
        with _client(secured.url, api_key=key) as allowed:
            reply = allowed.embeddings.create(model="tiny-embed", input=TEXTS)
            assert [m.id for m in allowed.models.list()] == ["tiny-embed", "tiny-news"]
        # gRPC on the open server: same repository, same vectors.
        _assert_equal_to_grpc(np.array([d.embedding for d in reply.data], np.float32),
                              http_server.address, TEXTS)


def test_no_authorization_header_at_all_is_401(secured: HttpServer) -> None:
    reply = httpx2.post(secured.url + "/v1/embeddings", timeout=10,
                        json={"model": "tiny-embed", "input": "股市"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
