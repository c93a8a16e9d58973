"""bert-as-service's HTTP API (server/api/http/bert_as_service.py) against a real server: /encode
answers gRPC Embed's raw vectors with the caller's id, pre-split words encode as the tokenizer
would encode them, and refusals come in Flask-JSON's shape (never a 500)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rest.conftest import HttpServer, call, cosine, grpc_embed
from tokenizers import Tokenizer

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元", "Apple发布新款iPhone"]
LONG = "沪指收复三千点" * 20  # over tiny models' 64 tokens


def encode(server: HttpServer, body: dict[str, Any]) -> tuple[Any, np.ndarray]:
    status, reply = call(server.url + "/encode", body)
    assert status == 200 and reply["status"] == 200, reply
    assert set(reply) == {"id", "result", "status"}
    return reply["id"], np.array(reply["result"], np.float32)


@pytest.mark.parametrize("request_id", [7, "batch-7", {"job": 1}])
def test_encode_equals_grpc_embed_and_echoes_the_id(http_server: HttpServer,
                                                    request_id: Any) -> None:
    echoed, vectors = encode(http_server, {"id": request_id, "texts": TEXTS,
                                           "is_tokenized": False})
    assert echoed == request_id
    reference = grpc_embed(http_server.address, TEXTS)  # raw, as bert-as-service's
    assert vectors.shape == reference.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1),
                               np.linalg.norm(reference, axis=1), rtol=1e-4)
    assert cosine(vectors, reference).min() >= 0.9999


def test_tokenized_words_encode_as_the_tokenizer_would(http_server: HttpServer,
                                                       model_dir: Callable[..., Path]) -> None:
    words = [["今天", "股市", "大涨"], ["Apple", "发布", "新款", "iPhone，", "涨3.5%"]]
    tokenizer = Tokenizer.from_file(str(model_dir("tiny-embed") / "tokenizer.json"))
    for text in words:  # the equivalence the module relies on, for this model's tokenizer
        assert (tokenizer.encode(text, is_pretokenized=True).ids
                == tokenizer.encode(" ".join(text)).ids)
    _, vectors = encode(http_server, {"id": 1, "texts": words, "is_tokenized": True})
    reference = grpc_embed(http_server.address, [" ".join(w) for w in words])
    assert cosine(vectors, reference).min() >= 0.9999
    # BERT splits Chinese per character, so the words equal the unsplit sentence
    assert cosine(vectors[:1], grpc_embed(http_server.address, [TEXTS[0]]))[0] >= 0.9999


def test_truncate_is_an_opt_in_extension(http_server: HttpServer) -> None:
    status, reply = call(http_server.url + "/encode", {"id": 1, "texts": [LONG]})
    assert (status, reply["status"], reply["type"]) == (400, 400, "ValueError")
    assert "truncate" in reply["description"]
    _, vectors = encode(http_server, {"id": 1, "texts": [LONG], "truncate": True})
    reference = grpc_embed(http_server.address, [LONG], truncate=True)
    assert cosine(vectors, reference).min() >= 0.9999


REFUSALS: list[Any] = [
    {"texts": ["a"]},  # no id, as bert-as-service
    {"id": 1},
    {"id": 1, "texts": "a"},
    {"id": 1, "texts": []},
    {"id": 1, "texts": ["a", 5]},
    {"id": 1, "texts": ["a", ""]},
    {"id": 1, "texts": ["字"] * 257},
    {"id": 1, "texts": ["a"], "is_tokenized": "yes"},
    {"id": 1, "texts": ["a", "b"], "is_tokenized": True},
    {"id": 1, "texts": [[]], "is_tokenized": True},
    {"id": 1, "texts": [["今", "##天"]], "is_tokenized": True},
    {"id": 1, "texts": ["a"], "truncate": "yes"},
    ["a"],
    b"id=1&texts=a",
]


@pytest.mark.parametrize("body", REFUSALS)
def test_refusals_are_400_in_flask_jsons_shape(http_server: HttpServer, body: Any) -> None:
    raw = body if isinstance(body, bytes) else None
    status, reply = call(http_server.url + "/encode", None if raw else body, raw)
    assert status == 400, reply
    assert set(reply) == {"status", "description", "type"}
    assert reply["status"] == 400 and reply["type"] == "ValueError" and reply["description"]


def test_status_routes(http_server: HttpServer) -> None:
    status, server = call(http_server.url + "/status/server")
    assert status == 200 and server["status"] == 200
    assert server["model_dir"] == "tiny-embed" and server["max_seq_len"] == 64
    assert server["pooling_strategy"] == 2 and server["pooling_layer"] == [-1]  # REDUCE_MEAN
    assert server["num_request"] >= 0
    status, client = call(http_server.url + "/status/client")
    assert status == 200 and client["status"] == 200 and client["output_fmt"] == "list"
