"""text-embeddings-inference's API (server/api/http/tei.py) against a real server: /embed equals
gRPC Embed, /predict equals gRPC Classify, /tokenize equals the model's tokenizer.json, /info
describes the model, and every refusal has TEI's status and shape (never a 500)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from rest.conftest import HttpServer, call, cosine, grpc_classify, grpc_embed
from tokenizers import Tokenizer

TEXTS = ["今天股市大涨", "央行宣布降准，释放长期资金约一万亿元", "Apple发布新款iPhone"]
LONG = "沪指收复三千点" * 20  # over tiny models' 64 tokens


def embed(server: HttpServer, body: dict[str, Any], path: str = "/embed") -> np.ndarray:
    status, reply = call(server.url + path, body)
    assert status == 200, reply
    return np.array(reply, np.float32)


def test_embed_a_string_and_a_list_equal_grpc(http_server: HttpServer) -> None:
    one = embed(http_server, {"inputs": TEXTS[0]})
    assert one.shape == (1, 64)
    many = embed(http_server, {"inputs": TEXTS})
    assert many.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)  # default true
    reference = grpc_embed(http_server.address, TEXTS)
    assert cosine(many, reference).min() >= 0.9999
    assert cosine(one, reference[:1]).min() >= 0.9999
    named = embed(http_server, {"inputs": TEXTS}, "/tei/tiny-embed/embed")
    np.testing.assert_allclose(named, many, atol=1e-6)


def test_normalize_false_gives_grpc_raw_vectors(http_server: HttpServer) -> None:
    raw = embed(http_server, {"inputs": TEXTS, "normalize": False})
    reference = grpc_embed(http_server.address, TEXTS)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), np.linalg.norm(reference, axis=1),
                               rtol=1e-4)
    assert np.linalg.norm(raw, axis=1).min() > 1.5  # so unlike unit vectors
    assert cosine(raw, reference).min() >= 0.9999


def test_truncate_and_its_direction(http_server: HttpServer) -> None:
    status, reply = call(http_server.url + "/embed", {"inputs": LONG})
    assert (status, reply["error_type"]) == (422, "Validation")
    assert "64" in reply["error"]
    for direction, wire in (("Right", pb.TRUNCATION_DIRECTION_RIGHT),
                            ("left", pb.TRUNCATION_DIRECTION_LEFT)):
        cut = embed(http_server, {"inputs": [LONG], "truncate": True,
                                  "truncation_direction": direction})
        reference = grpc_embed(http_server.address, [LONG], truncate=True,
                               truncation_direction=wire)
        assert cosine(cut, reference).min() >= 0.9999
    right = embed(http_server, {"inputs": [LONG + "结尾不同"], "truncate": True})
    left = embed(http_server, {"inputs": [LONG + "结尾不同"], "truncate": True,
                               "truncation_direction": "Left"})
    assert cosine(right, left)[0] < 0.9999


def test_dimensions_cut_then_normalize(http_server: HttpServer) -> None:
    reference = grpc_embed(http_server.address, TEXTS)[:, :8]
    cut = embed(http_server, {"inputs": TEXTS, "dimensions": 8})
    np.testing.assert_allclose(cut, reference / np.linalg.norm(reference, axis=1, keepdims=True),
                               atol=1e-5)
    raw = embed(http_server, {"inputs": TEXTS, "dimensions": 8, "normalize": False})
    np.testing.assert_allclose(raw, reference, atol=1e-5)


def _check_predictions(answer: list[dict[str, Any]], raw: bool = False) -> str:
    labels = [p["label"] for p in answer]
    assert sorted(labels) == ["negative", "neutral", "positive"]
    scores = [p["score"] for p in answer]
    assert scores == sorted(scores, reverse=True)
    total = float(np.exp(scores).sum()) if raw else sum(scores)
    assert total == pytest.approx(1.0, abs=1e-5)
    return str(labels[0])


def test_predict_one_text_and_a_batch_equal_grpc(http_server: HttpServer) -> None:
    url = http_server.url + "/tei/tiny-news/predict"
    expected = grpc_classify(http_server.address, TEXTS)
    for inputs in (TEXTS[0], [TEXTS[0]]):  # TEI: both are one text, answered as one list
        status, answer = call(url, {"inputs": inputs})
        assert status == 200, answer
        assert _check_predictions(answer) == expected[0]
    status, answers = call(url, {"inputs": [[t] for t in TEXTS]})
    assert status == 200 and len(answers) == 3
    assert [_check_predictions(a) for a in answers] == expected
    status, raw = call(url, {"inputs": [[t] for t in TEXTS], "raw_scores": True})
    assert status == 200
    assert [_check_predictions(a, raw=True) for a in raw] == expected
    assert abs(sum(p["score"] for p in raw[0]) - 1.0) > 0.5


@pytest.mark.parametrize("inputs", [["a", "b"], [["a", "b"]], [["a"], ["b", "c"]]])
def test_predict_refuses_pairs(http_server: HttpServer, inputs: Any) -> None:
    status, reply = call(http_server.url + "/tei/tiny-news/predict", {"inputs": inputs})
    assert (status, reply["error_type"]) == (422, "Validation")
    assert "pair" in reply["error"]


def test_predict_on_an_embedding_model_is_a_backend_error(http_server: HttpServer) -> None:
    status, reply = call(http_server.url + "/predict", {"inputs": "今天"})  # tiny-embed
    assert (status, reply["error_type"]) == (424, "Backend")
    assert "classification" in reply["error"]


def test_tokenize_equals_the_tokenizer_json(http_server: HttpServer,
                                            model_dir: Callable[..., Path]) -> None:
    tokenizer = Tokenizer.from_file(str(model_dir("tiny-embed") / "tokenizer.json"))
    texts = ["今天 Apple 发布 iPhone，股价涨3.5%", "天气"]
    status, reply = call(http_server.url + "/tokenize", {"inputs": texts})
    assert status == 200 and len(reply) == 2
    for text, tokens in zip(texts, reply, strict=True):
        expected = tokenizer.encode(text)
        assert [t["id"] for t in tokens] == expected.ids
        assert [t["special"] for t in tokens] == [bool(s) for s in expected.special_tokens_mask]
        assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None,
                             "stop": None}
        for token in tokens[1:-1]:  # UTF-8 byte offsets, as TEI's
            assert text.encode()[token["start"]:token["stop"]].decode() == token["text"]
    status, bare = call(http_server.url + "/tokenize",
                        {"inputs": texts[0], "add_special_tokens": False})
    assert status == 200
    assert [t["id"] for t in bare[0]] == tokenizer.encode(texts[0],
                                                          add_special_tokens=False).ids


def test_info_describes_the_model(http_server: HttpServer) -> None:
    status, info = call(http_server.url + "/info")
    assert status == 200
    assert info["model_id"] == "tiny-embed"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 64 and info["auto_truncate"] is False
    assert info["max_client_batch_size"] > 0
    status, info = call(http_server.url + "/tei/tiny-news/info")
    assert status == 200 and info["model_id"] == "tiny-news"
    classifier = info["model_type"]["classifier"]
    assert classifier["id2label"] == {"0": "positive", "1": "neutral", "2": "negative"}
    assert classifier["label2id"]["negative"] == 2


REFUSALS: list[tuple[str, Any, int, str]] = [
    ("/embed", {"inputs": []}, 400, "Empty"),
    ("/embed", {"inputs": ""}, 400, "Empty"),
    ("/embed", {"inputs": ["a", ""]}, 400, "Empty"),
    ("/tei/tiny-news/predict", {"inputs": []}, 400, "Empty"),
    ("/tokenize", {"inputs": []}, 400, "Empty"),
    ("/embed", {}, 422, "Validation"),
    ("/embed", {"inputs": 5}, 422, "Validation"),
    ("/embed", {"inputs": {"text": "a"}}, 422, "Validation"),
    ("/embed", {"inputs": [101, 102]}, 422, "Validation"),
    ("/embed", {"inputs": [[101, 102]]}, 422, "Validation"),
    ("/embed", {"inputs": [["a"]]}, 422, "Validation"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "Validation"),
    ("/embed", {"inputs": "a", "truncate": 1}, 422, "Validation"),
    ("/embed", {"inputs": "a", "truncation_direction": "up"}, 422, "Validation"),
    ("/embed", {"inputs": "a", "truncation_direction": ["Left"]}, 422, "Validation"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, 422, "Validation"),
    ("/embed", {"inputs": "a", "dimensions": 0}, 422, "Validation"),
    ("/embed", {"inputs": "a", "dimensions": 65}, 422, "Validation"),
    ("/embed", {"inputs": "   "}, 422, "Validation"),
    ("/embed", {"inputs": ["字"] * 257}, 422, "Validation"),
    ("/embed", ["a"], 422, "Validation"),
    ("/embed", b"{not json", 422, "Validation"),
    ("/tokenize", {"inputs": LONG}, 422, "Validation"),
    ("/tei/tiny-news/predict", {"inputs": ["a", "b", "c"]}, 422, "Validation"),
    ("/tei/tiny-news/predict", {"inputs": [["a"], "b"]}, 422, "Validation"),
    ("/tei/tiny-news/predict", {"inputs": "a", "raw_scores": "no"}, 422, "Validation"),
    ("/tei/nope/embed", {"inputs": "a"}, 404, "Validation"),
]


@pytest.mark.parametrize(("path", "body", "status", "error_type"), REFUSALS)
def test_refusals_have_teis_status_and_shape(http_server: HttpServer, path: str, body: Any,
                                             status: int, error_type: str) -> None:
    raw = body if isinstance(body, bytes) else None
    got, reply = call(http_server.url + path, None if raw else body, raw)
    assert (got, reply["error_type"]) == (status, error_type), reply
    assert set(reply) == {"error", "error_type"} and reply["error"]


def test_unknown_fields_are_ignored_as_tei_does(http_server: HttpServer) -> None:
    vectors = embed(http_server, {"inputs": "今天", "model": "whatever", "user": "x"})
    assert vectors.shape == (1, 64)


def test_a_body_over_the_limit_is_413_before_it_is_read(http_server: HttpServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", http_server.http_port, timeout=30)
    try:
        connection.putrequest("POST", "/embed")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()
        reply = connection.getresponse()
        assert reply.status == 413
        assert json.loads(reply.read())["error_type"] == "Validation"
    finally:
        connection.close()


def test_the_openapi_page_lists_the_routes(http_server: HttpServer) -> None:
    status, schema = call(http_server.url + "/openapi.json")
    assert status == 200
    assert {"/embed", "/predict", "/tokenize", "/info", "/tei/{model}/embed"} <= set(
        schema["paths"])


def test_huggingface_hubs_client(http_server: HttpServer) -> None:
    """What TEI callers run: huggingface_hub's InferenceClient pointed at the routes."""
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(model=http_server.url + "/embed", timeout=30)
    vectors = np.asarray(client.feature_extraction(TEXTS[1], normalize=False), np.float32)
    assert cosine(vectors.reshape(1, -1),
                  grpc_embed(http_server.address, TEXTS[1:2])).min() >= 0.9999
    client = hub.InferenceClient(model=http_server.url + "/tei/tiny-news/predict", timeout=30)
    # TEI answers one text with a flat list, which the client reads as its best label
    best = client.text_classification(TEXTS[0])
    assert best.label == grpc_classify(http_server.address, TEXTS[:1])[0]
