"""Text pairs through a real server: ids, type ids and answers equal to onnxruntime run on
Hugging Face's pair encoding; a pair model beside single-text models; Rerank by head and by
cosine; streams with pairs; hostile pairs refused by name."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess

FIRSTS = ["今天股市大涨", "央行宣布降准0.5个百分点", "暴雨来袭，城市内涝严重"]
SECONDS = ["沪指收复三千点，成交量放大", "释放长期资金约一万亿元", "球队客场两球取胜"]
LONG = "央行宣布降准，释放长期资金，股市应声大涨，沪指收复三千点。" * 4  # > 64 tokens


@pytest.fixture(scope="module")
def server(pair_model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    proc = start_server(pair_model_repository)
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.BertServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.BertServiceStub(channel)


class PairReference:
    """onnxruntime on Hugging Face's pair encoding (transformers' tokenizer), one pair a run."""

    def __init__(self, version_dir: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(version_dir / "tokenizer.json"))
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"),
                                            providers=["CPUExecutionProvider"])

    def encode(self, a: str, b: str, **truncation: Any) -> dict[str, list[int]]:
        return self.tokenizer(a, b, return_token_type_ids=True, **truncation)

    def run(self, a: str, b: str, output: str, **truncation: Any) -> np.ndarray:
        enc = self.encode(a, b, **truncation)
        feeds = {name: np.asarray([enc[name]], np.int64)
                 for name in ("input_ids", "attention_mask", "token_type_ids")}
        return self.session.run([output], feeds)[0][0]


@pytest.fixture(scope="module")
def ref(pair_model_repository: Path) -> dict[str, PairReference]:
    return {name: PairReference(pair_model_repository / name / "1")
            for name in ("tiny-embed", "tiny-pair")}


def _probabilities(result: pb.Classification) -> np.ndarray:
    row = np.zeros(len(result.labels), np.float32)
    for label in result.labels:
        row[label.index] = label.probability
    return row


def test_a_pair_model_answers_what_onnxruntime_gives_for_hugging_face_s_pairs(
        stub: pb_grpc.BertServiceStub, ref: dict[str, PairReference]) -> None:
    r = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS, text_pairs=SECONDS),
                      timeout=30)
    for a, b, result in zip(FIRSTS, SECONDS, r.results, strict=True):
        np.testing.assert_allclose(_probabilities(result),
                                   ref["tiny-pair"].run(a, b, "probabilities"), atol=1e-5)
        assert result.usage.token_count == len(ref["tiny-pair"].encode(a, b)["input_ids"])
    assert stub.GetModel(pb.GetModelRequest(model="tiny-pair"), timeout=30).text_pairs
    assert not stub.GetModel(pb.GetModelRequest(model="tiny-news"), timeout=30).text_pairs


@pytest.mark.parametrize(("strategy", "hf"), [
    (pb.TRUNCATION_STRATEGY_UNSPECIFIED, "longest_first"),
    (pb.TRUNCATION_STRATEGY_ONLY_SECOND, "only_second")])
def test_truncated_pairs_follow_the_strategy(stub: pb_grpc.BertServiceStub,
                                             ref: dict[str, PairReference], strategy: int,
                                             hf: str) -> None:
    r = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=["短句"], text_pairs=[LONG],
                                         truncate=True, truncation_strategy=strategy),
                      timeout=30)
    full = len(ref["tiny-pair"].encode("短句", LONG)["input_ids"])
    assert r.results[0].usage.truncated and r.results[0].usage.token_count == 64
    assert r.results[0].usage.truncated_tokens == full - 64
    np.testing.assert_allclose(
        _probabilities(r.results[0]),
        ref["tiny-pair"].run("短句", LONG, "probabilities", truncation=hf, max_length=64),
        atol=1e-5)
    tokens = stub.Tokenize(pb.TokenizeRequest(model="tiny-pair", texts=[LONG], text_pairs=["短句"],
                                              truncate=True, truncation_strategy=strategy),
                           timeout=30).results[0] if hf == "longest_first" else None
    if tokens is not None:
        expected = ref["tiny-pair"].encode(LONG, "短句", truncation=hf, max_length=64)
        assert list(tokens.ids) == expected["input_ids"]
        assert list(tokens.type_ids) == expected["token_type_ids"]


def test_embed_and_tokenize_take_pairs(stub: pb_grpc.BertServiceStub,
                                       ref: dict[str, PairReference]) -> None:
    r = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=FIRSTS, text_pairs=SECONDS),
                   timeout=30)
    for a, b, embedding in zip(FIRSTS, SECONDS, r.embeddings, strict=True):
        np.testing.assert_allclose(embedding.values, ref["tiny-embed"].run(a, b, "mean_layer2"),
                                   atol=1e-4)
    t = stub.Tokenize(pb.TokenizeRequest(model="tiny-embed", texts=FIRSTS, text_pairs=SECONDS),
                      timeout=30)
    for a, b, result in zip(FIRSTS, SECONDS, t.results, strict=True):
        expected = ref["tiny-embed"].encode(a, b)
        assert list(result.ids) == expected["input_ids"]
        assert list(result.type_ids) == expected["token_type_ids"]
        assert set(result.type_ids) == {0, 1} and result.tokens[0] == "[CLS]"


@pytest.mark.parametrize(("request_", "needle"), [
    (pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS), "classifies text pairs"),
    (pb.ClassifyRequest(model="tiny-news", texts=FIRSTS, text_pairs=SECONDS),
     "classifies single texts"),
    (pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS, text_pairs=SECONDS[:2]),
     "2 text_pairs for 3 texts"),
    (pb.ClassifyRequest(model="tiny-pair", texts=FIRSTS, text_pairs=["a", " ", "b"]),
     r"text_pairs\[1\] is empty"),
    (pb.ClassifyRequest(model="tiny-pair", texts=["短句"], text_pairs=[LONG]),
     r"pair 0 \(texts\[0\] \+ text_pairs\[0\]\) is \d+ tokens, over this model's limit of 64"),
    (pb.ClassifyRequest(model="tiny-pair", texts=[LONG], text_pairs=["短句"], truncate=True,
                        truncation_strategy=pb.TRUNCATION_STRATEGY_ONLY_SECOND),
     "truncation strategy only_second"),
    (pb.ClassifyRequest(model="tiny-pair", texts=["a"] * 10_000, text_pairs=["b"] * 10_000),
     "10000 texts in one message, over the limit of 256"),
    (pb.ClassifyRequest(model="tiny-pair", texts=["a"], text_pairs=["b"],
                        truncation_strategy=9), "unknown truncation_strategy 9"),
], ids=["pair model without pairs", "pairs to a single-text model", "count mismatch",
        "empty half", "over the limit", "strategy cannot fit", "10,000 pairs",
        "unknown strategy"])
def test_hostile_pairs_are_invalid_argument_by_name(stub: pb_grpc.BertServiceStub,
                                                    request_: pb.ClassifyRequest,
                                                    needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() is not None
    assert re.search(needle, info.value.details()), info.value.details()


def test_rerank_with_a_pair_model_orders_by_its_head(stub: pb_grpc.BertServiceStub) -> None:
    texts = [*SECONDS, "第四条候选"]
    r = stub.Rerank(pb.RerankRequest(model="tiny-pair", query="股市", texts=texts,
                                     return_text=True), timeout=30)
    assert r.method == pb.RERANK_METHOD_CROSS_ENCODER
    classified = stub.Classify(pb.ClassifyRequest(model="tiny-pair", texts=["股市"] * 4,
                                                  text_pairs=texts), timeout=30)
    match = [_probabilities(c)[-1] for c in classified.results]  # the last label: match
    assert sorted(res.index for res in r.results) == [0, 1, 2, 3]
    for res in r.results:
        assert res.score == pytest.approx(match[res.index], abs=1e-6)
        assert res.text == texts[res.index] and res.usage.token_count > 0
    scores = [res.score for res in r.results]
    assert scores == sorted(scores, reverse=True)
    raw = stub.Rerank(pb.RerankRequest(model="tiny-pair", query="股市", texts=texts, top_n=2,
                                       raw_scores=True), timeout=30)
    assert len(raw.results) == 2 and raw.results[0].index == r.results[0].index
    assert not raw.results[0].text
    p = match[raw.results[0].index]  # the raw score is the log-odds of the probability
    assert raw.results[0].score == pytest.approx(np.log(p / (1 - p)), abs=1e-4)


def test_rerank_on_an_embedding_model_is_cosine(stub: pb_grpc.BertServiceStub) -> None:
    query, texts = "今天股市大涨", ["沪指收复三千点", "球队客场取胜", "今天股市大涨"]
    r = stub.Rerank(pb.RerankRequest(model="tiny-embed", query=query, texts=texts), timeout=30)
    assert r.method == pb.RERANK_METHOD_COSINE
    vectors = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[query, *texts],
                                          normalize=True), timeout=30).embeddings
    unit = np.array([v.values for v in vectors])
    cosine = unit[1:] @ unit[0]
    assert [res.index for res in r.results] == list(np.argsort(-cosine, kind="stable"))
    for res in r.results:
        assert res.score == pytest.approx(cosine[res.index], abs=1e-5)
    assert r.results[0].index == 2 and r.results[0].score == pytest.approx(1.0, abs=1e-5)


def test_rerank_refuses_what_it_cannot_score(stub: pb_grpc.BertServiceStub) -> None:
    for request, needle in [
        (pb.RerankRequest(model="tiny-embed", query="", texts=["a"]), "query is empty"),
        (pb.RerankRequest(model="tiny-embed", query="q", texts=[]), "texts is empty"),
        (pb.RerankRequest(model="tiny-embed", query="q", texts=["a"], top_n=-1), "top_n"),
        (pb.RerankRequest(model="tiny-pair", query=LONG, texts=["短句"], truncate=True),
         "truncation strategy only_second"),
        (pb.RerankRequest(model="tiny-pair", query="问" * 60_000, texts=["答" * 1_000] * 20),
         "the query once per text"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.Rerank(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in (info.value.details() or ""), info.value.details()


def test_streams_with_pairs_keep_order_and_per_message_errors(
        stub: pb_grpc.BertServiceStub, ref: dict[str, PairReference]) -> None:
    messages = [pb.ClassifyRequest(request_id=str(i), model="tiny-pair", texts=[FIRSTS[i % 3]],
                                   text_pairs=[SECONDS[i % 3]]) for i in range(12)]
    messages[5] = pb.ClassifyRequest(request_id="5", model="tiny-pair", texts=["缺第二句"])
    answers = list(stub.ClassifyStream(iter(messages), timeout=60))
    assert [a.request_id for a in answers] == [str(i) for i in range(12)]
    assert answers[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "text_pairs" in answers[5].error.message
    for i, answer in enumerate(answers):
        if i == 5:
            continue
        assert not answer.error.message
        np.testing.assert_allclose(
            _probabilities(answer.results[0]),
            ref["tiny-pair"].run(FIRSTS[i % 3], SECONDS[i % 3], "probabilities"), atol=1e-5)
