"""Hostile requests against one real server: every field of every request message, filled by
hypothesis with what the proto allows (any unicode but surrogates, unknown enum values, any
int32/int64, huge repeated fields), plus hand-made cases at and over the size limits, broken
streams and bytes that are not protobuf at all.

Every call gets a valid answer or a defined status whose message names the problem and no
server internals; the server never dies, never logs a traceback of its own, and answers a
normal request correctly at the end (the last test of the module).

Bytes that do not parse as the request message get INVALID_ARGUMENT naming the message type
(server/api/decoding.py for unary calls, streams.py for streams).
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from bertstream.v1.model_config_pb2 import Pooling, Task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from conftest import ServerProcess

MODELS = {"tiny-embed": (), "tiny-news": ("positive", "neutral", "negative")}
HIDDEN = 64
MAX_TOKENS = 64
MAX_TEXTS = 256  # the server's defaults (--max-texts-per-request, --max-text-chars)
MAX_CHARS = 65_536
MiB = 1024 * 1024
MAX_RECEIVE = 64 * MiB

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# What must never reach a caller: tracebacks, source paths, Python exception classes, libraries.
LEAK = re.compile(
    r"Traceback|File \"|<class |\b[A-Z][A-Za-z]*(Error|Exception)\b|onnxruntime|"
    r"site-packages|internal server error",
)
# The server quotes what the caller sent (repr), so a model named "AError" comes back as
# 'AError': the caller's own text, not a leak. Quoted spans are left out of the LEAK check.
# Apostrophes inside words ("model's", "can't") are not quotes.
QUOTED = re.compile(r"(?<![A-Za-z])'(?:[^'\\]|\\.)*'(?![A-Za-z])|"
                    r'(?<![A-Za-z])"(?:[^"\\]|\\.)*"(?![A-Za-z])')

# Characters that break naive text handling: controls, format (zero-width, bidi overrides,
# BOM), combining marks, separators, RTL scripts, emoji with joiners, CJK, plane ends.
SPECIAL = (
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\t", "\n", "\r", "\x0b", "\x0c",
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069",
    "\ufeff", "\u00ad", "\u034f", "\u0301", "\u0308", "\u20dd", "\u0e49", "\u3000", "\u00a0",
    "\u2028", "\u2029", "\u1680", "\u05d0", "\u05e9", "\u0627", "\u0644", "\u06f1", "\ufdfd",
    "\U0001f600", "\U0001f3fb", "\ufe0f", "中", "文", "龘", "\U00020000", "\U0002a6d6", "ｗ",
    "ﾟ", "\ue000", "\ufffd", "\uffff", "\U0010ffff",
)
SEQUENCES = ("\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1e8\U0001f1f3", "[CLS]",
             "[SEP]", "[PAD]", "[MASK]", "[UNK]", "##", "e\u0301\u0301\u0301", "\r\n")
CHARS = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(SPECIAL))
SHORT_TEXT = st.one_of(
    st.text(CHARS, max_size=200),
    st.lists(st.one_of(CHARS, st.sampled_from(SEQUENCES)), max_size=60).map("".join),
)
LONG_TEXT = st.builds(lambda piece, n: (piece * n)[: MAX_CHARS + 8],
                      SHORT_TEXT.filter(bool).map(lambda t: t[:6]),
                      st.sampled_from([500, 4_000, MAX_CHARS // 6, MAX_CHARS]))
TEXT = st.one_of(SHORT_TEXT, st.sampled_from(["", " ", "\u3000\t\n", "中", "今天股市大涨"]),
                 LONG_TEXT)
TEXTS = st.one_of(
    st.lists(TEXT, max_size=5),
    st.lists(SHORT_TEXT, min_size=1, max_size=3).map(lambda ts: ts * 90),  # 90..270 texts
)
NAMES = st.one_of(
    st.sampled_from(["", "tiny-embed", "tiny-news", "../tiny-embed", "/etc/passwd", ".",
                     "..", "tiny-embed/../tiny-news", "tiny-embed\x00", "tiny-embed/1",
                     "ｔｉｎｙ-embed", ".hidden", "a" * 129, "a" * 100_000, "tiny-embed\n",
                     "%2e%2e%2f", "\\..\\x", "~root", "tiny-embed ", "TINY-EMBED", "*"]),
    st.text(CHARS, max_size=40),
)
INT64 = st.one_of(st.sampled_from([0, 0, 1, 2, -1, -(2**63), 2**63 - 1, 2**31, -(2**31) - 1]),
                  st.integers(-(2**63), 2**63 - 1))
INT32 = st.one_of(st.sampled_from([0, 1, 2, 3, -1, -2, -3, -(2**31), 2**31 - 1, 10**6, -10**6]),
                  st.integers(-(2**31), 2**31 - 1))


REQUEST_ID = st.one_of(st.text(CHARS, max_size=40),
                       st.sampled_from([10_000, 1_000_000]).map(lambda n: "r\u200d" * (n // 2)))
# Texts every field of which is hostile in content, but which the limits let through.
FAIR_TEXTS = st.lists(SHORT_TEXT.filter(lambda t: t.strip()) | LONG_TEXT.map(lambda t: t[:4000]),
                      min_size=1, max_size=5)


class Fields:
    """Draws each field from its fair strategy, except up to two fields (chosen per example)
    drawn from their hostile one: most examples then get through validation with hostile
    text, and each field's own refusal is reached alone and in pairs."""

    def __init__(self, draw: st.DrawFn, names: tuple[str, ...]) -> None:
        self.draw = draw
        self.hostile = draw(st.sets(st.sampled_from(names), max_size=2))

    def __call__(self, name: str, fair: st.SearchStrategy[Any],
                 hostile: st.SearchStrategy[Any]) -> Any:
        return self.draw(hostile if name in self.hostile else fair)


def valid(values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(list(values))


COMMON = ("model", "version", "texts", "pooling", "pooling_layer", "truncation_direction")


def _embedding_fields(f: Fields, models: list[str]) -> dict[str, Any]:
    kw = {
        "request_id": f.draw(REQUEST_ID),
        "model": f("model", valid(models), NAMES),
        "version": f("version", valid([0, 1]), INT64),
        "texts": f("texts", FAIR_TEXTS, TEXTS),
        "pooling": f("pooling", valid(Pooling.values()), INT32),
        "truncation_direction": f("truncation_direction",
                                  valid(pb.TruncationDirection.values()), INT32),
        "normalize": f.draw(st.booleans()),
        "truncate": f.draw(st.booleans()),
        "raw_values": f.draw(st.booleans()),
    }
    layer = f("pooling_layer", valid([None, 1, 2, -1, -2]), INT32)
    if layer is not None:
        kw["pooling_layer"] = layer
    return kw


@st.composite
def embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    f = Fields(draw, COMMON)
    return pb.EmbedRequest(**_embedding_fields(f, ["", "tiny-embed", "tiny-news"]))


@st.composite
def classify_requests(draw: st.DrawFn) -> pb.ClassifyRequest:
    f = Fields(draw, (*COMMON, "top_k"))
    return pb.ClassifyRequest(**_embedding_fields(f, ["tiny-news"]),
                              top_k=f("top_k", valid([0, 1, 2, 3, 4, 2**31 - 1]), INT32),
                              return_embedding=draw(st.booleans()))


@st.composite
def tokenize_requests(draw: st.DrawFn) -> pb.TokenizeRequest:
    f = Fields(draw, ("model", "version", "texts", "truncation_direction", "task"))
    return pb.TokenizeRequest(
        model=f("model", valid(["", "tiny-embed", "tiny-news"]), NAMES),
        version=f("version", valid([0, 1]), INT64), texts=f("texts", FAIR_TEXTS, TEXTS),
        truncate=draw(st.booleans()),
        truncation_direction=f("truncation_direction", valid(pb.TruncationDirection.values()),
                               INT32),
        task=f("task", valid(Task.values()), INT32),
    )


EMBED, CLASSIFY, TOKENIZE = embed_requests(), classify_requests(), tokenize_requests()
MODEL_NAME = st.one_of(valid(["", *MODELS]), NAMES)

HYPOTHESIS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)


# --- the server, and how answers are judged -------------------------------------------------


@pytest.fixture(scope="module")
def server(model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """One server for the module; explicit mode so LoadModel and UnloadModel do real work."""
    proc = start_server(model_repository, "--model-control-mode", "explicit",
                        "--load-model", "*")
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 4 * MAX_RECEIVE),
               ("grpc.max_receive_message_length", 4 * MAX_RECEIVE)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.BertServiceStub:
    return pb_grpc.BertServiceStub(channel)


def check_error(code: grpc.StatusCode | int, details: str) -> None:
    """A defined status with a message a person can act on and nothing from inside."""
    if isinstance(code, int):
        code = next(c for c in grpc.StatusCode if c.value[0] == code)
    assert code in ALLOWED, (code, details[:500])
    assert details.strip(), code
    assert len(details) < 2_000, details[:500]
    assert not LEAK.search(QUOTED.sub('""', details)), details[:500]


# (rpc, "OK" or status name) -> count over the module: the last test checks that hypothesis
# reached both valid answers and errors of every rpc, and prints the table.
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()


def call(method: Callable[..., Any], request: Any, timeout: float = 60) -> Any:
    """The response, or None after checking the error."""
    rpc = type(request).__name__.removesuffix("Request")
    try:
        response = method(request, timeout=timeout)
    except grpc.RpcError as exc:
        OUTCOMES[rpc, exc.code().name] += 1
        check_error(exc.code(), exc.details() or "")
        return None
    OUTCOMES[rpc, "OK"] += 1
    return response


def vector(e: pb.Embedding) -> np.ndarray:
    values = (np.frombuffer(e.raw, dtype="<f4") if e.raw
              else np.asarray(e.values, dtype=np.float32))
    assert values.size == math.prod(e.shape), (values.size, list(e.shape))
    assert np.isfinite(values).all()
    return values.reshape(tuple(e.shape))


def check_usage(usage: pb.TextUsage, truncate: bool) -> None:
    assert 2 <= usage.token_count <= MAX_TOKENS, usage
    assert usage.truncated == (usage.truncated_tokens > 0)
    assert truncate or not usage.truncated


def check_embedding(e: pb.Embedding, pooling: int, normalize: bool, raw: bool,
                    truncate: bool) -> None:
    assert bool(e.raw) == raw and (not e.values or not raw)
    check_usage(e.usage, truncate)
    v = vector(e)
    if pooling == Pooling.POOLING_TOKENS:
        assert v.shape == (e.usage.token_count, HIDDEN)
    else:
        width = 2 * HIDDEN if pooling == Pooling.POOLING_MEAN_MAX else HIDDEN
        assert v.shape == (width,)
    if normalize:
        norms = np.linalg.norm(v.reshape(-1, v.shape[-1]), axis=-1)
        assert np.all((np.abs(norms - 1) < 1e-3) | (norms < 1e-6)), norms


def check_embed(request: pb.EmbedRequest, r: pb.EmbedResponse) -> None:
    assert r.request_id == request.request_id and r.model in MODELS and r.version == 1
    assert not r.HasField("error")
    assert len(r.embeddings) == len(request.texts)
    assert r.pooling in (Pooling.POOLING_MEAN, Pooling.POOLING_MAX, Pooling.POOLING_CLS,
                         Pooling.POOLING_MEAN_MAX, Pooling.POOLING_TOKENS)
    assert r.pooling_layer in (1, 2)
    for e in r.embeddings:
        check_embedding(e, r.pooling, request.normalize, request.raw_values, request.truncate)


def check_classify(request: pb.ClassifyRequest, r: pb.ClassifyResponse) -> None:
    assert r.request_id == request.request_id and r.model == "tiny-news" and r.version == 1
    assert not r.HasField("error")
    assert len(r.results) == len(request.texts)
    labels = MODELS["tiny-news"]
    for result in r.results:
        check_usage(result.usage, request.truncate)
        assert len(result.labels) == min(request.top_k or len(labels), len(labels))
        probs = [s.probability for s in result.labels]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert all(labels[s.index] == s.label for s in result.labels)
        assert result.HasField("embedding") == request.return_embedding
        if request.return_embedding:
            pooling = request.pooling or Pooling.POOLING_MEAN
            check_embedding(result.embedding, pooling, request.normalize, request.raw_values,
                            request.truncate)


# --- every field, from hypothesis -----------------------------------------------------------


@HYPOTHESIS
@given(request=EMBED)
def test_embed_any_request(stub: pb_grpc.BertServiceStub, request: pb.EmbedRequest) -> None:
    response = call(stub.Embed, request)
    if response is not None:
        check_embed(request, response)


@HYPOTHESIS
@given(request=CLASSIFY)
def test_classify_any_request(stub: pb_grpc.BertServiceStub,
                              request: pb.ClassifyRequest) -> None:
    response = call(stub.Classify, request)
    if response is not None:
        check_classify(request, response)


@HYPOTHESIS
@given(request=TOKENIZE)
def test_tokenize_any_request(stub: pb_grpc.BertServiceStub,
                              request: pb.TokenizeRequest) -> None:
    r = call(stub.Tokenize, request)
    if r is None:
        return
    assert request.task in (0, Task.TASK_EMBED, Task.TASK_CLASSIFY), "unknown task accepted"
    assert r.model in MODELS and r.version == 1 and r.max_sequence_length == MAX_TOKENS
    assert len(r.results) == len(request.texts)
    for t in r.results:
        n = len(t.ids)
        assert len(t.tokens) == len(t.offset_starts) == len(t.offset_ends) == n
        check_usage(t.usage, request.truncate)
        assert t.usage.token_count == n
        assert all(0 <= s <= e for s, e in zip(t.offset_starts, t.offset_ends, strict=True))


@HYPOTHESIS
@given(name=MODEL_NAME, version=st.one_of(valid([0, 1]), INT64), ready_only=st.booleans())
def test_model_rpcs_any_request(stub: pb_grpc.BertServiceStub, name: str, version: int,
                                ready_only: bool) -> None:
    r = call(stub.GetModel, pb.GetModelRequest(model=name, version=version))
    if r is not None:
        assert r.model in MODELS and r.embedding_dimension == HIDDEN
        assert list(r.labels) == list(MODELS[r.model]) and r.ready_versions == [1]
    listed = stub.ListModels(pb.ListModelsRequest(ready_only=ready_only), timeout=30)
    assert {(m.model, m.version, m.state) for m in listed.models} >= {
        (model, 1, pb.VERSION_STATE_READY) for model in MODELS}
    loaded = call(stub.LoadModel, pb.LoadModelRequest(model=name))
    if loaded is not None:  # only the real models load, and reloading one changes nothing
        assert name in MODELS
        assert [(v.version, v.state) for v in loaded.versions] == [(1, pb.VERSION_STATE_READY)]
    if name not in MODELS:  # unloading a real model would starve the other tests
        assert call(stub.UnloadModel, pb.UnloadModelRequest(model=name)) is None


@settings(HYPOTHESIS, max_examples=25)
@given(requests=st.lists(st.one_of(EMBED, st.builds(
    pb.EmbedRequest, request_id=REQUEST_ID, texts=st.lists(SHORT_TEXT, max_size=3))),
    min_size=1, max_size=6))
def test_embed_stream_answers_every_message_in_order(
    stub: pb_grpc.BertServiceStub, requests: list[pb.EmbedRequest]
) -> None:
    good = pb.EmbedRequest(request_id="last", texts=["今天股市大涨"])
    responses = list(stub.EmbedStream(iter([*requests, good]), timeout=120))
    assert [r.request_id for r in responses] == [q.request_id for q in [*requests, good]]
    for request, response in zip(requests, responses, strict=False):
        if response.HasField("error"):
            OUTCOMES["EmbedStream", grpc.StatusCode(
                next(c for c in grpc.StatusCode if c.value[0] == response.error.code)).name] += 1
            check_error(response.error.code, response.error.message)
            assert not response.embeddings
        else:
            OUTCOMES["EmbedStream", "OK"] += 1
            check_embed(request, response)
    check_embed(good, responses[-1])


@settings(HYPOTHESIS, max_examples=25)
@given(requests=st.lists(CLASSIFY, min_size=1, max_size=5))
def test_classify_stream_answers_every_message_in_order(
    stub: pb_grpc.BertServiceStub, requests: list[pb.ClassifyRequest]
) -> None:
    good = pb.ClassifyRequest(request_id="last", model="tiny-news", texts=["今天股市大涨"])
    responses = list(stub.ClassifyStream(iter([*requests, good]), timeout=120))
    assert [r.request_id for r in responses] == [q.request_id for q in [*requests, good]]
    for request, response in zip(requests, responses, strict=False):
        if response.HasField("error"):
            check_error(response.error.code, response.error.message)
        else:
            check_classify(request, response)
    check_classify(good, responses[-1])


# --- hand-made cases: sizes, streams, bytes -------------------------------------------------


def expect(code: grpc.StatusCode, method: Callable[..., Any], request: Any, words: str = "",
           timeout: float = 60) -> str:
    with pytest.raises(grpc.RpcError) as error:
        method(request, timeout=timeout)
    assert error.value.code() == code, error.value.details()
    details = error.value.details() or ""
    assert words in details, details
    return details


def test_a_one_megabyte_text_is_refused_by_its_length(stub: pb_grpc.BertServiceStub) -> None:
    text = "中文\u200d😀" * (MiB // 4)
    for method, request in (
        (stub.Embed, pb.EmbedRequest(texts=["ok", text], truncate=True)),
        (stub.Classify, pb.ClassifyRequest(model="tiny-news", texts=[text])),
        (stub.Tokenize, pb.TokenizeRequest(texts=[text], truncate=True)),
    ):
        started = time.monotonic()
        details = expect(grpc.StatusCode.INVALID_ARGUMENT, method, request,
                         f"over the limit of {MAX_CHARS}")
        assert "texts[" in details and time.monotonic() - started < 5


def test_texts_at_the_character_limit(stub: pb_grpc.BertServiceStub) -> None:
    at_limit = "今天股市大涨" * (MAX_CHARS // 6) + "涨" * (MAX_CHARS % 6)
    assert len(at_limit) == MAX_CHARS
    r = stub.Embed(pb.EmbedRequest(texts=[at_limit], truncate=True,
                                   truncation_direction=pb.TRUNCATION_DIRECTION_LEFT),
                   timeout=60)
    usage = r.embeddings[0].usage
    assert (usage.token_count, usage.truncated) == (MAX_TOKENS, True)
    assert usage.truncated_tokens == MAX_CHARS + 2 - MAX_TOKENS  # one token per CJK character
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Embed, pb.EmbedRequest(texts=[at_limit]),
           f"over this model's limit of {MAX_TOKENS}; shorten it or set truncate")
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Embed,
           pb.EmbedRequest(texts=[at_limit + "涨"], truncate=True),
           f"texts[0] has {MAX_CHARS + 1} characters")


def test_a_message_over_the_total_character_limit(stub: pb_grpc.BertServiceStub) -> None:
    """Texts each under the per-text limit, together over the per-message one (1,048,576):
    refused before any tokenizing, so one caller cannot hold a tokenizer thread for a minute."""
    text = "今天股市大涨，沪指收复三千点。" * 2_700  # 40,500 characters
    started = time.monotonic()
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Embed,
           pb.EmbedRequest(texts=[text] * 26, truncate=True),
           f"{26 * len(text)} characters in one message, over the limit of 1048576")
    assert time.monotonic() - started < 5
    r = stub.Embed(pb.EmbedRequest(texts=[text] * 25, truncate=True), timeout=120)
    assert len(r.embeddings) == 25


def test_a_hundred_thousand_texts_fail_fast(stub: pb_grpc.BertServiceStub) -> None:
    for method, request in (
        (stub.Embed, pb.EmbedRequest(texts=["新闻"] * 100_000)),
        (stub.Classify, pb.ClassifyRequest(model="tiny-news", texts=["新闻"] * 100_000)),
        (stub.Tokenize, pb.TokenizeRequest(texts=["新闻"] * 100_000)),
    ):
        started = time.monotonic()
        expect(grpc.StatusCode.INVALID_ARGUMENT, method, request,
               f"100000 texts in one message, over the limit of {MAX_TEXTS}")
        assert time.monotonic() - started < 5
    r = stub.Embed(pb.EmbedRequest(texts=["新闻"] * MAX_TEXTS, raw_values=True), timeout=60)
    assert len(r.embeddings) == MAX_TEXTS


def test_messages_at_and_over_the_receive_limit(stub: pb_grpc.BertServiceStub) -> None:
    at_limit = pb.EmbedRequest(texts=["a" * (MAX_RECEIVE - 5)])
    assert at_limit.ByteSize() == MAX_RECEIVE
    expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Embed, at_limit,
           f"has {MAX_RECEIVE - 5} characters, over the limit")
    over = pb.EmbedRequest(texts=["a" * (MAX_RECEIVE - 4)])
    assert over.ByteSize() == MAX_RECEIVE + 1
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Embed, over,
           "Received message larger than max")
    many = pb.EmbedRequest(texts=["中" * 1_000] * 25_000)  # ~75 MB in small pieces
    assert many.ByteSize() > MAX_RECEIVE
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Embed, many,
           "Received message larger than max")


def test_a_hostile_message_mid_stream_fails_alone(stub: pb_grpc.BertServiceStub) -> None:
    hostile = [
        pb.EmbedRequest(request_id="empty"),
        pb.EmbedRequest(request_id="model", model="../../etc", texts=["x"]),
        pb.EmbedRequest(request_id="pooling", texts=["x"], pooling=-7),
        pb.EmbedRequest(request_id="layer", texts=["x"], pooling_layer=-(2**31)),
        pb.EmbedRequest(request_id="direction", texts=["x"], truncation_direction=2**31 - 1),
        pb.EmbedRequest(request_id="version", texts=["x"], version=-(2**63)),
        pb.EmbedRequest(request_id="long", texts=["中" * 200]),
        pb.EmbedRequest(request_id="count", texts=["x"] * (MAX_TEXTS + 1)),
        pb.EmbedRequest(request_id="chars", texts=["x" * (MAX_CHARS + 1)]),
        pb.EmbedRequest(request_id="blank", texts=["ok", "\u3000 \t"]),
    ]
    requests = []
    for i, bad in enumerate(hostile):
        requests += [pb.EmbedRequest(request_id=f"good{i}", texts=[f"第{i}条新闻"]), bad]
    requests.append(pb.EmbedRequest(request_id="good-last", texts=["最后一条"]))
    responses = list(stub.EmbedStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    for request, response in zip(requests, responses, strict=True):
        if request.request_id.startswith("good"):
            check_embed(request, response)
        else:
            assert response.HasField("error"), request.request_id
            check_error(response.error.code, response.error.message)


# Bytes that are not the request message: INVALID_ARGUMENT from the decode guard; bytes that
# happen to parse reach the servicer.
GARBAGE = [
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
    b"\x22\xff\xff\xff\x0f",  # texts: a length far past the end
    b"\x22\x02\xff\xfe",  # texts: invalid UTF-8
    b"\x0a\x03\xed\xa0\x80",  # request_id: an encoded surrogate
    b"\x07",  # field 0
    b"\x23" * 200,  # nested start-groups
    bytes(range(256)) * 64,
]


@pytest.mark.parametrize("method", ["Embed", "Classify", "Tokenize", "GetModel", "LoadModel",
                                    "UnloadModel", "ListModels"])
def test_bytes_that_are_not_protobuf(channel: grpc.Channel, method: str) -> None:
    send = channel.unary_unary(f"/bertstream.v1.BertService/{method}")
    unparsed = 0
    for payload in GARBAGE:
        try:
            send(payload, timeout=30)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            check_error(exc.code(), details)
            if "does not parse" in details:
                assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert f"bertstream.v1.{method}Request" in details, details
                unparsed += 1
    assert unparsed >= 3, "the varint, length and nesting payloads must not parse"
    # Unknown fields are skipped by protobuf: the message reaches the servicer.
    unknown = b"\xa2\x06\x03abc" + pb.EmbedRequest(texts=["新闻"]).SerializeToString()
    if method == "Embed":
        response = pb.EmbedResponse.FromString(send(unknown, timeout=30))
        assert len(response.embeddings) == 1


@pytest.mark.parametrize("method", ["EmbedStream", "ClassifyStream"])
def test_garbage_in_a_stream_ends_only_that_stream(channel: grpc.Channel,
                                                  stub: pb_grpc.BertServiceStub,
                                                  method: str) -> None:
    stream = channel.stream_stream(f"/bertstream.v1.BertService/{method}")
    message = pb.EmbedRequest if method == "EmbedStream" else pb.ClassifyRequest
    good = message(request_id="1", model="tiny-news", texts=["新闻"]).SerializeToString()
    answers = []
    with pytest.raises(grpc.RpcError) as error:
        for raw in stream(iter([good, b"\x22\xff\xff\xff\x0f", good]), timeout=30):
            answers.append(raw)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert f"a stream message does not parse as {message.DESCRIPTOR.full_name}" in \
        (error.value.details() or "")
    assert len(answers) == 1  # the good message before the bad one is answered
    assert len(stub.Embed(pb.EmbedRequest(texts=["新闻"]), timeout=30).embeddings) == 1


def test_a_heavy_request_does_not_stop_the_others(stub: pb_grpc.BertServiceStub) -> None:
    """64 texts of 8,192 CJK characters, truncated: seconds of tokenizing; a small request
    sent meanwhile is answered."""
    heavy = pb.EmbedRequest(texts=["今天股市大涨" * 1365] * 64, truncate=True, raw_values=True)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(stub.Embed(heavy, timeout=120)))
    thread.start()
    time.sleep(0.2)
    latencies = []
    while thread.is_alive() and len(latencies) < 20:
        started = time.monotonic()
        r = stub.Embed(pb.EmbedRequest(texts=["新闻"]), timeout=30)
        latencies.append(time.monotonic() - started)
        assert len(r.embeddings) == 1
    thread.join()
    assert len(result[0].embeddings) == 64
    assert not latencies or max(latencies) < 5, latencies


# --- last: the server survived everything above ---------------------------------------------


def test_the_server_is_alive_correct_and_logged_no_traceback_of_its_own(
    server: ServerProcess, stub: pb_grpc.BertServiceStub, model_repository: Path
) -> None:
    assert server.proc.poll() is None, "".join(server.lines[-40:])
    r = stub.Embed(pb.EmbedRequest(texts=["今天股市大涨，沪指收复三千点"]), timeout=30)
    assert (r.model, r.version, list(r.embeddings[0].shape)) == ("tiny-embed", 1, [HIDDEN])
    folder = model_repository / "tiny-embed" / "1"
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("今天股市大涨，沪指收复三千点")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids.ids]), "token_type_ids": np.zeros((1, len(ids.ids)),
                                                                          np.int64),
             "attention_mask": np.ones((1, len(ids.ids)), np.int64)}
    expected = session.run(["mean_layer2"], feeds)[0][0]
    np.testing.assert_allclose(vector(r.embeddings[0]), expected, atol=1e-4)

    print("\nhypothesis outcomes:", *sorted(OUTCOMES.items()), sep="\n  ")
    for rpc in ("Embed", "Classify", "Tokenize", "GetModel", "LoadModel", "EmbedStream"):
        ok = OUTCOMES[rpc, "OK"]
        failed = sum(n for (r, code), n in OUTCOMES.items() if r == rpc and code != "OK")
        assert ok and failed, f"{rpc}: {ok} valid answers, {failed} errors"
    time.sleep(0.2)  # let the log drain
    log = "".join(server.lines)
    assert "internal error" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert server.stop() == 0
