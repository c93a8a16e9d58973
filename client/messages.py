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
    "tokenize_request",
]

POOLINGS = {
    None: Pooling.POOLING_UNSPECIFIED, "mean": Pooling.POOLING_MEAN, "max": Pooling.POOLING_MAX,
    "cls": Pooling.POOLING_CLS, "mean_max": Pooling.POOLING_MEAN_MAX,
    "tokens": Pooling.POOLING_TOKENS,
}
DIRECTIONS = {"right": pb.TRUNCATION_DIRECTION_RIGHT, "left": pb.TRUNCATION_DIRECTION_LEFT}
STATES = {v: k.removeprefix("VERSION_STATE_") for k, v in pb.VersionState.items()}


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


def _pooling(pooling: str | None) -> int:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {[p for p in POOLINGS if p]}")
    return POOLINGS[pooling]


def embed_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                  pooling: str | None = None, pooling_layer: int | None = None,
                  normalize: bool = False, truncate: bool = False, truncation: str = "right",
                  request_id: str = "", raw_values: bool = True) -> pb.EmbedRequest:
    return pb.EmbedRequest(request_id=request_id, pooling=_pooling(pooling),
                           pooling_layer=pooling_layer, normalize=normalize,
                           raw_values=raw_values,
                           **_common(model, version, texts, truncate, truncation))


def classify_request(texts: str | Sequence[str], *, model: str = "", version: int = 0,
                     top_k: int = 0, truncate: bool = False, truncation: str = "right",
                     request_id: str = "") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(request_id=request_id, top_k=top_k,
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
