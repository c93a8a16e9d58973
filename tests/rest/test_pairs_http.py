"""Pairs and rerank in every HTTP dialect that has them, and KServe's TEXT_PAIR over gRPC too:
each answer equals gRPC's BertService answer for the same pairs, and each refusal has the
dialect's status and shape. One server over the tiny models plus `tiny-pair`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from rest.conftest import HttpServer, call, grpc_embed, start_http

if TYPE_CHECKING:
    from conftest import ServerProcess

FIRSTS = ["今天股市大涨", "央行宣布降准", "暴雨来袭"]
SECONDS = ["沪指收复三千点", "释放长期资金约一万亿元", "城市内涝严重"]


@pytest.fixture(scope="module")
def server(pair_model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[HttpServer]:
    http = start_http(start_server, pair_model_repository)
    yield http
    assert http.process.stop() == 0
    assert "Traceback" not in "".join(http.process.lines), "".join(http.process.lines)


@pytest.fixture(scope="module")
def stub(server: HttpServer) -> Iterator[pb_grpc.BertServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.BertServiceStub(channel)


def _grpc_probabilities(stub: pb_grpc.BertServiceStub, firsts: list[str],
                        seconds: list[str]) -> np.ndarray:
    reply = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=firsts,
                                             text_pairs=seconds), timeout=30)
    rows = np.zeros((len(firsts), 3), np.float32)
    for row, result in zip(rows, reply.results, strict=True):
        for label in result.labels:
            row[label.index] = label.probability
    return rows


def _tei_rows(answers: list[list[dict[str, Any]]], labels: list[str]) -> np.ndarray:
    return np.array([[next(p["score"] for p in answer if p["label"] == label)
                      for label in labels] for answer in answers], np.float32)


# -- TEI ---------------------------------------------------------------------------------------

def test_tei_predict_takes_a_pair_and_a_batch_of_pairs(server: HttpServer,
                                                       stub: pb_grpc.BertServiceStub) -> None:
    labels = list(stub.GetModel(pb.GetModelRequest(model="tiny-pair"), timeout=30).labels)
    expected = _grpc_probabilities(stub, FIRSTS, SECONDS)
    url = server.url + "/tei/tiny-pair/predict"
    status, one = call(url, {"inputs": [FIRSTS[0], SECONDS[0]]})
    assert status == 200, one
    np.testing.assert_allclose(_tei_rows([one], labels)[0], expected[0], atol=1e-6)
    status, many = call(url, {"inputs": [[a, b] for a, b in zip(FIRSTS, SECONDS, strict=True)]})
    assert status == 200, many
    np.testing.assert_allclose(_tei_rows(many, labels), expected, atol=1e-6)


@pytest.mark.parametrize(("path", "inputs", "needle"), [
    ("/tei/tiny-pair/predict", "今天", "classifies text pairs"),
    ("/tei/tiny-pair/predict", [["a"], ["b"]], "classifies text pairs"),
    ("/tei/tiny-news/predict", ["a", "b"], "classifies single texts"),
    ("/tei/tiny-pair/predict", [["a", "b"], ["c"]], "mixes single texts and pairs"),
    ("/tei/tiny-pair/predict", [["a", "b", "c"]], "one-text or two-text lists"),
    ("/tei/tiny-pair/predict", [["a", 1]], "one-text or two-text lists"),
    ("/tei/tiny-pair/predict", [["a", "b"]] * 10_000, "over the limit of 256"),
])
def test_tei_predict_refuses_the_wrong_kind_with_422(server: HttpServer, path: str,
                                                     inputs: Any, needle: str) -> None:
    status, reply = call(server.url + path, {"inputs": inputs})
    assert (status, reply["error_type"]) == (422, "Validation"), reply
    assert needle in reply["error"]


def test_tei_rerank_with_a_pair_model_equals_grpc(server: HttpServer,
                                                  stub: pb_grpc.BertServiceStub) -> None:
    texts = [*SECONDS, "球队客场取胜"]
    expected = stub.Rerank(pb.RerankRequest(model="tiny-pair", query="股市", texts=texts),
                           timeout=30)
    status, ranks = call(server.url + "/tei/tiny-pair/rerank",
                         {"query": "股市", "texts": texts, "return_text": True})
    assert status == 200, ranks
    assert [r["index"] for r in ranks] == [r.index for r in expected.results]
    for rank, want in zip(ranks, expected.results, strict=True):
        assert rank["score"] == pytest.approx(want.score, abs=1e-6)
        assert rank["text"] == texts[rank["index"]]
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    status, raw = call(server.url + "/tei/tiny-pair/rerank",
                       {"query": "股市", "texts": texts, "raw_scores": True})
    assert status == 200 and "text" not in raw[0]
    assert [r["index"] for r in raw] == [r["index"] for r in ranks]  # log-odds: same order
    status, info = call(server.url + "/tei/tiny-pair/info")
    assert status == 200 and info["rerank"] == "cross-encoder" and "reranker" in info["model_type"]


def test_tei_rerank_on_the_default_embedding_model_is_cosine(server: HttpServer) -> None:
    query, texts = "今天股市大涨", ["沪指收复三千点", "球队客场取胜", "今天股市大涨"]
    status, ranks = call(server.url + "/rerank", {"query": query, "texts": texts})
    assert status == 200, ranks
    unit = grpc_embed(server.address, [query, *texts], normalize=True)
    cosine = unit[1:] @ unit[0]
    assert [r["index"] for r in ranks] == np.argsort(-cosine, kind="stable").tolist()
    for rank in ranks:
        assert rank["score"] == pytest.approx(float(cosine[rank["index"]]), abs=1e-5)
    status, info = call(server.url + "/info")
    assert status == 200 and info["rerank"] == "cosine" and info["text_pairs"] is False


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"query": "q", "texts": []}, 400, "Empty"),
    ({"query": "", "texts": ["a"]}, 400, "Empty"),
    ({"texts": ["a"]}, 422, "Validation"),
    ({"query": "q", "texts": "a"}, 422, "Validation"),
    ({"query": "q", "texts": ["a"] * 10_000}, 422, "Validation"),
    ({"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "Validation"),
])
def test_tei_rerank_refusals(server: HttpServer, body: dict[str, Any], status: int,
                             kind: str) -> None:
    got, reply = call(server.url + "/tei/tiny-pair/rerank", body)
    assert (got, reply["error_type"]) == (status, kind), reply


# -- bert-as-service ---------------------------------------------------------------------------

def test_bert_as_service_reads_a_triple_bar_as_a_pair(server: HttpServer) -> None:
    texts = [f"{FIRSTS[0]} ||| {SECONDS[0]}", FIRSTS[1], f"{FIRSTS[2]} ||| {SECONDS[2]}"]
    status, reply = call(server.url + "/encode", {"id": 7, "texts": texts})
    assert status == 200, reply
    vectors = np.array(reply["result"], np.float32)
    pairs = grpc_embed(server.address, [FIRSTS[0], FIRSTS[2]],
                       text_pairs=[SECONDS[0], SECONDS[2]])
    single = grpc_embed(server.address, [FIRSTS[1]])
    np.testing.assert_allclose(vectors[[0, 2]], pairs, atol=1e-5)
    np.testing.assert_allclose(vectors[1], single[0], atol=1e-5)
    unpaired = grpc_embed(server.address, [texts[0]])  # the bars read as text would differ
    assert not np.allclose(vectors[0], unpaired[0], atol=1e-3)


# -- KServe, REST and gRPC, through tritonclient -------------------------------------------------

def _kserve_pairs(module: Any, firsts: list[str], seconds: list[str]) -> list[Any]:
    inputs = []
    for name, texts in (("TEXT", firsts), ("TEXT_PAIR", seconds)):
        tensor = module.InferInput(name, [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kserve_text_pair_equals_grpc(server: HttpServer, stub: pb_grpc.BertServiceStub,
                                      protocol: str) -> None:
    module = pytest.importorskip(f"tritonclient.{protocol}")
    from tritonclient.utils import InferenceServerException

    url = f"127.0.0.1:{server.http_port}" if protocol == "http" else server.address
    client = module.InferenceServerClient(url=url)
    result = client.infer("tiny-pair", _kserve_pairs(module, FIRSTS, SECONDS))
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               _grpc_probabilities(stub, FIRSTS, SECONDS), atol=1e-6)
    metadata = client.get_model_metadata("tiny-pair")
    names = [i["name"] if isinstance(i, dict) else i.name
             for i in (metadata["inputs"] if isinstance(metadata, dict) else metadata.inputs)]
    assert names == ["TEXT", "TEXT_PAIR"]
    with pytest.raises(InferenceServerException, match="one second text per text"):
        client.infer("tiny-pair", _kserve_pairs(module, FIRSTS, SECONDS[:2]))
    with pytest.raises(InferenceServerException, match="classifies text pairs"):
        client.infer("tiny-pair", _kserve_pairs(module, FIRSTS, SECONDS)[:1])
    client.close()
