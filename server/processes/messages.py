"""Every message between a front-end process and the engine process, one typed record each.

Records are NamedTuples: link.py pickles them as it pickled bare tuples (their numpy arrays
still travel out of band), and both ends `match` on the record's class. A new message is a
record here, a `case` in the receiving end's dispatch, and a line in
tests/unit/test_link_messages.py, which round-trips every record in MESSAGES.

Front end -> engine: Hello (first, once), Submit, Cancel, Unpin, Ack, LoadModel, UnloadModel.
Engine -> front end: Snapshot, Result, Error, Reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..engine.costmodel import CostModel
from ..repository.snapshot import RepositorySnapshot

__all__ = [
    "FROM_ENGINE", "FROM_FRONT_END", "MESSAGES", "Ack", "Cancel", "Error", "Hello", "LoadModel",
    "Message", "Reply", "Result", "Snapshot", "Submit", "UnloadModel", "Unpin", "VersionInfo",
]


@dataclass(frozen=True)
class VersionInfo:
    """What a front end needs to route to and tokenize for one READY version."""

    uid: int
    model: str
    version: int
    path: str
    config: bytes  # ModelConfig, serialized
    labels: tuple[str, ...]
    provider: str
    cost: CostModel | None  # measured at warm-up, for GetModel


# -- front end -> engine ----------------------------------------------------------------------

class Hello(NamedTuple):
    """The first message on a connection: who the front end is (its callers are keyed by it)."""

    name: str


class Submit(NamedTuple):
    """One request's packed token ids for a version uid (the version must be pinned here)."""

    rid: int
    uid: int
    outputs: tuple[str, ...]
    wait: bool  # wait for room in a full queue (streams) instead of Overloaded
    ids: np.ndarray  # int64, every text's ids back to back
    lengths: list[int]
    starts: list[int]
    type_ids: np.ndarray | None
    priority: int
    caller: str | None  # the front end's name for the caller; the engine adds the front end's
    timeout_s: float  # in the queue; 0: none
    trace: str | None = None  # the request span's W3C traceparent when sampled (tracing.py)


class Cancel(NamedTuple):
    """The caller is gone: drop request `rid` if it has not run."""

    rid: int


class Unpin(NamedTuple):
    """Nothing here routes to `uid` any more, as decided on snapshot `seq`."""

    uid: int
    seq: int


class Ack(NamedTuple):
    """This front end routes by snapshot `seq` now."""

    seq: int


class LoadModel(NamedTuple):
    rid: int
    name: str


class UnloadModel(NamedTuple):
    rid: int
    name: str


# -- engine -> front end ----------------------------------------------------------------------

class Snapshot(NamedTuple):
    """The repository as the engine sees it, and the READY versions a front end may route to."""

    seq: int
    snapshot: RepositorySnapshot
    versions: list[VersionInfo]


class Result(NamedTuple):
    """Request `rid`'s rows per output, and how long it queued and ran."""

    rid: int
    queue_s: float
    infer_s: float
    rows: dict[str, Any]


class Error(NamedTuple):
    """Request `rid` failed: the error's class name in errors.py ('' for an internal fault)."""

    rid: int
    name: str
    message: str


class Reply(NamedTuple):
    """LoadModel / UnloadModel `rid` is done and every front end routes by it; `error` is
    (class name, message) or None."""

    rid: int
    error: tuple[str, str] | None


FROM_FRONT_END = (Hello, Submit, Cancel, Unpin, Ack, LoadModel, UnloadModel)
FROM_ENGINE = (Snapshot, Result, Error, Reply)
MESSAGES = FROM_FRONT_END + FROM_ENGINE
Message = (Hello | Submit | Cancel | Unpin | Ack | LoadModel | UnloadModel | Snapshot | Result
           | Error | Reply)
