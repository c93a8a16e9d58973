"""Request building and response parsing shared by the sync and async clients.

Only the call sites differ between `BertClient` and `AsyncBertClient`; everything that
touches a message lives here, so the two cannot drift.

Text pairs: `pairs` beside `texts` (one second segment per text, sent as `text_pairs`) reads
texts[i] and pairs[i] as one pair, `[CLS] a [SEP] b [SEP]` with token type ids 0 then 1, as
the model's tokenizer pairs them; `truncation_strategy` (Hugging Face's names) says which half
`truncate` cuts. Whether the counts match and the halves are non-empty is the server's check,
so its message is the one the caller reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1.model_config_pb2 import Pooling

__all__ = [
    "ClientError", "Label", "ModelStatus", "RankedText", "Ranking", "StreamResult", "Tokens",
    "classify_request", "embed_request", "parse_classify", "parse_embed", "parse_models",
    "parse_rerank", "parse_tokenize", "rerank_request", "schedule", "tokenize_request",
]

POOLINGS = {
    None: Pooling.POOLING_UNSPECIFIED, "mean": Pooling.POOLING_MEAN, "max": Pooling.POOLING_MAX,
    "cls": Pooling.POOLING_CLS, "mean_max": Pooling.POOLING_MEAN_MAX,
    "tokens": Pooling.POOLING_TOKENS,
}
DIRECTIONS = {"right": pb.TRUNCATION_DIRECTION_RIGHT, "left": pb.TRUNCATION_DIRECTION_LEFT}
# None: the server's default (longest_first; only_second for Rerank, which keeps the query).
STRATEGIES = {
    None: pb.TRUNCATION_STRATEGY_UNSPECIFIED,
    "longest_first": pb.TRUNCATION_STRATEGY_LONGEST_FIRST,
    "only_first": pb.TRUNCATION_STRATEGY_ONLY_FIRST,
    "only_second": pb.TRUNCATION_STRATEGY_ONLY_SECOND,
}
METHODS = {pb.RERANK_METHOD_CROSS_ENCODER: "cross_encoder", pb.RERANK_METHOD_COSINE: "cosine"}
STATES = {v: k.removeprefix("VERSION_STATE_") for k, v in pb.VersionState.items()}
MAX_PRIORITY = 2**32 - 1  # uint32 priority
MAX_TIMEOUT_US = 2**64 - 1  # uint64 timeout_us


class ClientError(Exception):
    """A failed call or stream item; `.code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ClientError:
        return cls(err.code(), err.details() or "")  # type: ignore[attr-defined]

    @classmethod
    def from_proto(cls, err: pb.Error) -> ClientError:
        code = next((c for c in grpc.StatusCode if c.value[0] == err.code),
                    grpc.StatusCode.UNKNOWN)
        return cls(code, err.message)


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Tokens:
    tokens: list[str]
    ids: list[int]
    truncated_tokens: int
    type_ids: list[int] = field(default_factory=list)  # 0 the text, 1 its pair


@dataclass(frozen=True)
class RankedText:
    """One text of a rerank answer: its index in the request, its score, and the text when
    the call asked for it (`return_text`)."""

    index: int
    score: float
    text: str | None = None
    token_count: int = 0  # tokens the model saw for it (with the query, for a pair model)


@dataclass(frozen=True)
class Ranking:
    """A rerank answer: `results` best first (ties keep request order); `method` is
    "cross_encoder" (a pair model's head scored each (query, text)) or "cosine" (an embedding
    model: cosine of the query's and the text's vectors). Iterates, indexes and counts as
    its results."""

    results: list[RankedText]
    method: str
    model: str = ""
    version: int = 0

    def __iter__(self) -> Iterator[RankedText]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> RankedText:
        return self.results[i]


@dataclass(frozen=True)
class ModelStatus:
    model: str
    version: int
    state: str  # READY, LOADING, UNAVAILABLE, ...
    reason: str


@dataclass(frozen=True)
class StreamResult:
    """One stream response: `value` (vectors or labels) or `error`, never both."""

    index: int
    request_id: str
    value: object = None
    error: ClientError | None = None
    version: int = 0


def _texts(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _pairs(texts: str | Sequence[str], pairs: str | Sequence[str] | None) -> list[str]:
    """The text_pairs field: none, or the second segments (a str beside a str text)."""
    if pairs is None:
        return []
    if isinstance(pairs, str) != isinstance(texts, str):
        raise ValueError("pairs must be a str when texts is a str, else a list of str "
                         "(one second text per text)")
    return _texts(pairs)


def _truncation(truncation: str, strategy: str | None) -> dict[str, int]:
    if truncation not in DIRECTIONS:
        raise ValueError(f"truncation must be one of {sorted(DIRECTIONS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"truncation_strategy must be one of {[s for s in STRATEGIES if s]}")
    return {"truncation_direction": DIRECTIONS[truncation],
            "truncation_strategy": STRATEGIES[strategy]}


def _common(model: str, version: int, texts: str | Sequence[str], truncate: bool,
            truncation: str, pairs: str | Sequence[str] | None = None,
            truncation_strategy: str | None = None) -> dict[str, object]:
    return {"model": model, "version": version, "texts": _texts(texts), "truncate": truncate,
            "text_pairs": _pairs(texts, pairs), **_truncation(truncation, truncation_strategy)}


def _whole(name: str, value: object, top: int, meaning: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int >= 0 ({meaning}), not {value!r}")
    number = value.__index__()  # type: ignore[attr-defined]  # int, numpy integers
    if not 0 <= number <= top:
        raise ValueError(f"{name} must be an int from 0 to {top} ({meaning}), not {number}")
    return number


def schedule(priority: object = 0, timeout_us: object = 0) -> dict[str, int]:
    """The checked `priority` and `timeout_us` fields of an EmbedRequest or ClassifyRequest
    (see embed_request); ValueError for anything but an int >= 0. Which levels exist is the
    model's business: the server checks the range."""
    return {"priority": _whole("priority", priority, MAX_PRIORITY,
                               "1 is the highest level; 0 lets the server decide"),
            "timeout_us": _whole("timeout_us", timeout_us, MAX_TIMEOUT_US,
                                 "microseconds in the queue; 0: the level's policy")}


def _pooling(pooling: str | None) -> int:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {[p for p in POOLINGS if p]}")
    return POOLINGS[pooling]


def embed_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                  pooling: str | None = None, pooling_layer: int | None = None,
                  normalize: bool = False, truncate: bool = False, truncation: str = "right",
                  request_id: str = "", raw_values: bool = True, priority: int = 0,
                  timeout_us: int = 0, pairs: str | Sequence[str] | None = None,
                  truncation_strategy: str | None = None) -> pb.EmbedRequest:
    """One Embed / EmbedStream message; ValueError for a bad pooling, truncation, priority
    or timeout_us.

    `pairs`: a second segment for each text (see the module's docstring): the vector of the
    pair. `truncation_strategy`: "longest_first" (None, the default), "only_first" or
    "only_second": which half `truncate` cuts.

    `priority`: the queue level of the message's texts, 1 the highest (Triton's numbering;
    a model has `dynamic_batching { priority_levels }` of them, 2 by default; the server
    refuses a level the model does not have). 0, the default: the server
    decides: level 1 for a unary call of up to 16 texts, the model's default level (the
    lowest) for stream messages and larger calls. A lower level is never starved: once
    `max_skipped_batches` batches in a row (default 4) went to higher levels, it gets the next.
    `timeout_us`: the longest the texts may wait in the queue, in microseconds, before the
    call (or stream message) fails DEADLINE_EXCEEDED; 0, the default: the level's queue
    policy.
    """
    return pb.EmbedRequest(request_id=request_id, pooling=_pooling(pooling),
                           pooling_layer=pooling_layer, normalize=normalize,
                           raw_values=raw_values, **schedule(priority, timeout_us),
                           **_common(model, version, texts, truncate, truncation, pairs,
                                     truncation_strategy))


def classify_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                     top_k: int = 0, truncate: bool = False, truncation: str = "right",
                     request_id: str = "", priority: int = 0,
                     timeout_us: int = 0, pairs: str | Sequence[str] | None = None,
                     truncation_strategy: str | None = None) -> pb.ClassifyRequest:
    """One Classify / ClassifyStream message; `priority`, `timeout_us`, `pairs` and
    `truncation_strategy` as in embed_request. A pair model (GetModel's text_pairs) needs
    `pairs`; a single-text model refuses them."""
    return pb.ClassifyRequest(request_id=request_id, top_k=top_k,
                              **schedule(priority, timeout_us),
                              **_common(model, version, texts, truncate, truncation, pairs,
                                        truncation_strategy))


def tokenize_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                     truncate: bool = False, truncation: str = "right",
                     pairs: str | Sequence[str] | None = None,
                     truncation_strategy: str | None = None) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(**_common(model, version, texts, truncate, truncation, pairs,
                                        truncation_strategy))


def rerank_request(query: str, texts: Sequence[str], *, model: str = "", version: int = 0,
                   top_n: int = 0, raw_scores: bool = False, return_text: bool = False,
                   truncate: bool = False, truncation: str = "right",
                   truncation_strategy: str | None = None, request_id: str = "",
                   priority: int = 0, timeout_us: int = 0) -> pb.RerankRequest:
    """One Rerank message (TEI's /rerank fields). `top_n`: keep the best n (0: all);
    `raw_scores`: a pair model's logit (the log-odds of the last label) instead of its
    probability; `truncation_strategy` defaults to only_second on the server, which keeps
    the query whole; `priority` and `timeout_us` as in embed_request."""
    if not isinstance(query, str):
        raise ValueError(f"query must be a str, not {type(query).__name__}")
    if isinstance(texts, str):
        raise ValueError("texts must be a list of str (the candidates), not one str")
    return pb.RerankRequest(
        request_id=request_id, model=model, version=version, query=query, texts=list(texts),
        top_n=_whole("top_n", top_n, 2**31 - 1, "the best results kept; 0: all"),
        raw_scores=raw_scores, return_text=return_text, truncate=truncate,
        **_truncation(truncation, truncation_strategy), **schedule(priority, timeout_us))


def _array(e: pb.Embedding) -> np.ndarray:
    if e.raw:  # copied: frombuffer views are read-only, and callers normalise in place
        return np.frombuffer(e.raw, dtype="<f4").reshape(tuple(e.shape)).astype(np.float32)
    return np.asarray(e.values, dtype=np.float32).reshape(tuple(e.shape))


def parse_embed(response: pb.EmbedResponse) -> np.ndarray | list[np.ndarray]:
    """[n, dim] for pooled vectors; a list of [tokens, dim] arrays for token vectors."""
    arrays = [_array(e) for e in response.embeddings]
    if response.pooling == Pooling.POOLING_TOKENS:
        return arrays
    return np.stack(arrays) if arrays else np.zeros((0, 0), np.float32)


def parse_classify(response: pb.ClassifyResponse) -> list[list[Label]]:
    return [[Label(s.label, s.index, s.probability) for s in r.labels] for r in response.results]


def parse_tokenize(response: pb.TokenizeResponse) -> list[Tokens]:
    return [Tokens(list(r.tokens), list(r.ids), r.usage.truncated_tokens, list(r.type_ids))
            for r in response.results]


def parse_rerank(response: pb.RerankResponse) -> Ranking:
    """The server's order (best first) kept; an unasked-for text is None, never ""."""
    results = [RankedText(r.index, r.score, r.text or None, r.usage.token_count)
               for r in response.results]
    return Ranking(results, METHODS.get(response.method, "unknown"), response.model,
                   response.version)


def parse_models(response: pb.ListModelsResponse) -> list[ModelStatus]:
    return [ModelStatus(m.model, m.version, STATES.get(m.state, "UNKNOWN"), m.reason)
            for m in response.models]
