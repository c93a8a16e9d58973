"""Request building and response parsing shared by the sync and async clients.

Only the call sites differ between `BertClient` and `AsyncBertClient`; everything that
touches a message lives here, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1.model_config_pb2 import Pooling

__all__ = [
    "ClientError", "Label", "ModelStatus", "StreamResult", "Tokens", "classify_request",
    "embed_request", "parse_classify", "parse_embed", "parse_models", "parse_tokenize",
    "schedule", "tokenize_request",
]

POOLINGS = {
    None: Pooling.POOLING_UNSPECIFIED, "mean": Pooling.POOLING_MEAN, "max": Pooling.POOLING_MAX,
    "cls": Pooling.POOLING_CLS, "mean_max": Pooling.POOLING_MEAN_MAX,
    "tokens": Pooling.POOLING_TOKENS,
}
DIRECTIONS = {"right": pb.TRUNCATION_DIRECTION_RIGHT, "left": pb.TRUNCATION_DIRECTION_LEFT}
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


def _common(model: str, version: int, texts: str | Sequence[str], truncate: bool,
            truncation: str) -> dict[str, object]:
    if truncation not in DIRECTIONS:
        raise ValueError(f"truncation must be one of {sorted(DIRECTIONS)}")
    return {"model": model, "version": version, "texts": _texts(texts), "truncate": truncate,
            "truncation_direction": DIRECTIONS[truncation]}


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
                  timeout_us: int = 0) -> pb.EmbedRequest:
    """One Embed / EmbedStream message; ValueError for a bad pooling, truncation, priority
    or timeout_us.

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
                           **_common(model, version, texts, truncate, truncation))


def classify_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                     top_k: int = 0, truncate: bool = False, truncation: str = "right",
                     request_id: str = "", priority: int = 0,
                     timeout_us: int = 0) -> pb.ClassifyRequest:
    """One Classify / ClassifyStream message; `priority` and `timeout_us` as in
    embed_request."""
    return pb.ClassifyRequest(request_id=request_id, top_k=top_k,
                              **schedule(priority, timeout_us),
                              **_common(model, version, texts, truncate, truncation))


def tokenize_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                     truncate: bool = False, truncation: str = "right") -> pb.TokenizeRequest:
    return pb.TokenizeRequest(**_common(model, version, texts, truncate, truncation))


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
    return [Tokens(list(r.tokens), list(r.ids), r.usage.truncated_tokens)
            for r in response.results]


def parse_models(response: pb.ListModelsResponse) -> list[ModelStatus]:
    return [ModelStatus(m.model, m.version, STATES.get(m.state, "UNKNOWN"), m.reason)
            for m in response.models]
