"""Unary rpcs against a real server process: values, metadata and every input rule."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from bertstream.client import BertClient, ClientError
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1.model_config_pb2 import Pooling, Task

TEXTS = [
    "今天股市大涨，沪指收复三千点",
    "苹果发布iPhone 15，售价5999元。",
    "颱風來襲，學校停課一天",
]
ODD = ["\x00\x07控制字符\x1b", "表情😀🚀符号", "零宽\u200d连接\u200b符", "a\u0301\u0308 combining",
       "עברית RTL 混合", "繁體中文與简体中文", "ＦＵＬＬ　ｗｉｄｔｈ！"]


def test_embed_matches_direct_onnxruntime(bc: BertClient, reference) -> None:  # type: ignore
    vectors = bc.encode(TEXTS)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    for text, vec in zip(TEXTS, vectors, strict=True):
        np.testing.assert_allclose(vec, reference["tiny-embed"].run(text, "mean_layer2"),
                                   atol=1e-4)


@pytest.mark.parametrize(("pooling", "output", "dim"), [
    ("mean", "mean", 64), ("max", "max", 64), ("cls", "cls", 64), ("mean_max", "mean_max", 128)])
@pytest.mark.parametrize("layer", [None, -1, -2, 1, 2])
def test_poolings_and_layers(bc: BertClient, reference, pooling, output, dim, layer) -> None:  # type: ignore[no-untyped-def]
    vec = bc.encode(TEXTS[0], pooling=pooling, pooling_layer=layer)[0]
    absolute = {None: 2, -1: 2, -2: 1, 1: 1, 2: 2}[layer]
    assert vec.shape == (dim,)
    np.testing.assert_allclose(vec, reference["tiny-embed"].run(TEXTS[0],
                                                                f"{output}_layer{absolute}"),
                               atol=1e-4)


def test_token_vectors_and_normalize(bc: BertClient, reference) -> None:  # type: ignore[no-untyped-def]
    tokens = bc.encode(TEXTS[:2], pooling="tokens")
    for text, arr in zip(TEXTS[:2], tokens, strict=True):
        np.testing.assert_allclose(arr, reference["tiny-embed"].run(text, "tokens_layer2"),
                                   atol=1e-4)
    unit = bc.encode(TEXTS, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    for array in (unit, *tokens):  # the client hands out arrays callers may change in place
        array *= 2.0


def test_response_metadata(stub) -> None:  # type: ignore[no-untyped-def]
    r = stub.Embed(pb.EmbedRequest(request_id="x1", texts=TEXTS[:1], model="tiny-embed"),
                   timeout=30)
    assert (r.request_id, r.model, r.version) == ("x1", "tiny-embed", 1)
    assert r.pooling == Pooling.POOLING_MEAN and r.pooling_layer == 2
    assert r.embeddings[0].usage.token_count > 10 and not r.embeddings[0].usage.truncated
    assert r.timings.total_us >= r.timings.inference_us > 0


def test_classify_ranks_labels(address: str, reference) -> None:  # type: ignore[no-untyped-def]
    with BertClient(address, model="tiny-news") as news:
        ranked = news.classify(TEXTS)
        top1 = news.classify(TEXTS, top_k=1)
    for text, labels, best in zip(TEXTS, ranked, top1, strict=True):
        assert {lab.label for lab in labels} == {"positive", "neutral", "negative"}
        probs = [lab.probability for lab in labels]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert len(best) == 1 and best[0] == labels[0]
        expected = reference["tiny-news"].run(text, "probabilities")
        assert labels[0].index == int(expected.argmax())
        by_index = sorted(labels, key=lambda x: x.index)
        np.testing.assert_allclose([lab.probability for lab in by_index], expected, atol=1e-5)


def test_classify_can_return_the_embedding(stub, reference) -> None:  # type: ignore[no-untyped-def]
    r = stub.Classify(pb.ClassifyRequest(model="tiny-news", texts=TEXTS[:1], top_k=2,
                                         return_embedding=True, pooling=Pooling.POOLING_CLS),
                      timeout=30)
    assert len(r.results[0].labels) == 2
    np.testing.assert_allclose(r.results[0].embedding.values,
                               reference["tiny-news"].run(TEXTS[0], "cls_layer2"), atol=1e-4)


def test_tokenize(bc: BertClient) -> None:
    [tok] = bc.tokenize("苹果发布iPhone 15，售价5999元")
    assert tok.tokens[0] == "[CLS]" and tok.tokens[-1] == "[SEP]"
    assert "苹" in tok.tokens and "，" in tok.tokens
    assert len(tok.ids) == len(tok.tokens) and tok.truncated_tokens == 0


def test_models_and_metadata(bc: BertClient, engine: str) -> None:
    models = {(m.model, m.version): m.state for m in bc.models()}
    assert models == {("tiny-embed", 1): "READY", ("tiny-news", 1): "READY"}
    info = bc.model_info("tiny-news")
    assert info.task == Task.TASK_CLASSIFY and list(info.labels) == ["positive", "neutral",
                                                                       "negative"]
    assert info.embedding_dimension == 64 and info.max_sequence_length == 64
    assert list(info.pooling_layers) == [1, 2] and info.default_version == 1
    assert info.execution_provider == {"onnxruntime": "CPUExecutionProvider",
                                       "openvino": "OpenVINO CPU f32"}[engine]
    assert bc.model_info("").model == "tiny-embed"  # the server's default model


def test_odd_texts_get_answers(bc: BertClient) -> None:
    vectors = bc.encode(ODD, truncate=True)
    assert vectors.shape == (len(ODD), 64) and np.isfinite(vectors).all()
    # Odd texts batched with ordinary ones change nothing for the ordinary ones.
    mixed = bc.encode([TEXTS[0], *ODD, TEXTS[1]])
    np.testing.assert_allclose(mixed[[0, -1]], bc.encode([TEXTS[0], TEXTS[1]]), atol=1e-4)


def test_truncation_is_never_silent(bc: BertClient, stub) -> None:  # type: ignore[no-untyped-def]
    long_text = "长" * 200
    with pytest.raises(ClientError) as info:
        bc.encode(long_text)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "202 tokens" in info.value.message and "limit of 64" in info.value.message
    for direction, keep in ((pb.TRUNCATION_DIRECTION_RIGHT, "始"),
                            (pb.TRUNCATION_DIRECTION_LEFT, "终")):
        r = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=["始" + long_text + "终"],
                                       truncate=True, truncation_direction=direction),
                       timeout=30)
        usage = r.embeddings[0].usage
        assert (usage.token_count, usage.truncated, usage.truncated_tokens) == (64, True, 140)
        tok = stub.Tokenize(pb.TokenizeRequest(model="tiny-embed", texts=["始" + long_text + "终"],
                                               truncate=True, truncation_direction=direction),
                            timeout=30)
        assert keep in tok.results[0].tokens


def code_of(call, request):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(("request_", "code", "fragment"), [
    (pb.EmbedRequest(model="tiny-embed"), "INVALID_ARGUMENT", "texts is empty"),
    (pb.EmbedRequest(model="tiny-embed", texts=["ok", ""]), "INVALID_ARGUMENT",
     "texts[1] is empty"),
    (pb.EmbedRequest(model="tiny-embed", texts=[" \t\n\u3000"]), "INVALID_ARGUMENT", "whitespace"),
    (pb.EmbedRequest(model="tiny-embed", texts=["字"] * 257), "INVALID_ARGUMENT", "limit of 256"),
    (pb.EmbedRequest(model="tiny-embed", texts=["字" * 65_537]), "INVALID_ARGUMENT",
     "65537 characters"),
    (pb.EmbedRequest(model="nope", texts=["x"]), "NOT_FOUND", "'nope'"),
    (pb.EmbedRequest(model="../etc", texts=["x"]), "INVALID_ARGUMENT", "invalid model name"),
    (pb.EmbedRequest(model="tiny-embed", version=7, texts=["x"]), "NOT_FOUND", "no version 7"),
    (pb.EmbedRequest(model="tiny-embed", version=-1, texts=["x"]), "INVALID_ARGUMENT", "version"),
    (pb.EmbedRequest(model="tiny-embed", texts=["x"], pooling_layer=5), "INVALID_ARGUMENT",
     "pooling_layer 5"),
    (pb.EmbedRequest(model="tiny-embed", texts=["x"], pooling_layer=-3), "INVALID_ARGUMENT",
     "pooling_layer -3"),
    (pb.EmbedRequest(model="tiny-embed", texts=["x"], pooling=42), "INVALID_ARGUMENT", "pooling"),
    (pb.EmbedRequest(model="tiny-embed", texts=["x"], truncation_direction=9), "INVALID_ARGUMENT",
     "truncation_direction"),
])
def test_embed_input_rules(stub, request_, code, fragment) -> None:  # type: ignore[no-untyped-def]
    got, details = code_of(stub.Embed, request_)
    assert got.name == code and fragment in details


def test_classify_input_rules(stub) -> None:  # type: ignore[no-untyped-def]
    got, details = code_of(stub.Classify, pb.ClassifyRequest(model="tiny-embed", texts=["x"]))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "no classification head" in details
    got, details = code_of(stub.Classify, pb.ClassifyRequest(model="tiny-news", texts=["x"],
                                                             top_k=-1))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in details


def test_model_control_needs_explicit_mode(stub) -> None:  # type: ignore[no-untyped-def]
    for rpc, request in ((stub.LoadModel, pb.LoadModelRequest(model="tiny-embed")),
                         (stub.UnloadModel, pb.UnloadModelRequest(model="tiny-embed"))):
        got, message = code_of(rpc, request)
        assert got == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode explicit" in message
    assert stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS)).embeddings


def test_expired_deadline(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS * 50), timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS), timeout=30).embeddings


def test_raw_values_carry_the_same_vectors(stub) -> None:  # type: ignore[no-untyped-def]
    for pooling in (Pooling.POOLING_UNSPECIFIED, Pooling.POOLING_TOKENS):
        plain = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS, pooling=pooling),
                           timeout=30)
        raw = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS, pooling=pooling,
                                         raw_values=True), timeout=30)
        for a, b in zip(plain.embeddings, raw.embeddings, strict=True):
            assert not b.values and len(b.raw) == 4 * int(np.prod(b.shape))
            assert list(a.shape) == list(b.shape)
            np.testing.assert_array_equal(np.frombuffer(b.raw, "<f4"),
                                          np.asarray(a.values, np.float32))
