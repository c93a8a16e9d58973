"""The engine process (`--frontends N`): the models, their batchers and sessions, and the
control plane, serving front-end processes over a unix socket (ipc.py).

Contract:
- One `ModelManager` here owns every model (repository scans, LoadModel / UnloadModel, poll
  mode). After each change the engine sends every front end a snapshot: the repository rows
  and the READY versions it may route to, each named by its `uid`. A front end acknowledges
  a snapshot once it routes by it; LoadModel and UnloadModel answer only when every front end
  has, so a swap is seen by all of them at once.
- Cross-process leases: a version sent to a front end is held (`ModelVersion.hold`) for that
  front end until it says `unpin` (it routes elsewhere and its last request on the version
  ended) or its connection closes. A retired version's session is released only then, so a
  request finishes on the version it started on, whichever process it entered.
- Requests: `submit` carries one request's packed token ids for a version uid, with its
  priority level, its caller and its queue timeout (the batcher's scheduler decides across
  every front end's callers); the answer is
  its rows per output (`result`) or its error by class name (`error`). `cancel` drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.batch import Encoded
from ..engine.batcher import WorkItem
from ..engine.costmodel import CostModel
from ..errors import BertstreamError, to_status
from ..repository.manager import ModelManager
from ..repository.versions import ModelVersion
from .link import FrameLink, Message

__all__ = ["Engine", "VersionInfo"]

log = logging.getLogger("bertstream.engine")
ACK_TIMEOUT_S = 30.0  # a front end that does not acknowledge a snapshot in this long is stuck


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


class _Link:
    """One front end's connection: its pins, its requests in flight, what it acknowledged."""

    def __init__(self) -> None:
        self.name = "?"
        self.frames: FrameLink
        self.pins: dict[int, ModelVersion] = {}
        self.sent: dict[int, int] = {}  # uid -> the last snapshot that offered it
        self.pending: dict[int, WorkItem] = {}
        self.acked = 0

    def send(self, message: Message) -> None:
        self.frames.send(message)  # dropped once the connection is closing


class Engine:
    """The unix-socket server the front ends talk to."""

    def __init__(self, manager: ModelManager, on_control: Callable[[], None]) -> None:
        self.manager = manager
        self._on_control = on_control  # after LoadModel / UnloadModel (explicit memory)
        self._links: set[_Link] = set()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._acked = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None

    async def listen(self, path: Path) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._connect, path=str(path))
        path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.frames.close()

    # -- snapshots ----------------------------------------------------------------------

    def broadcast(self) -> int:
        """Send every front end the current snapshot; returns its sequence number."""
        seq = self._last_seq = next(self._seq)
        routable = [mv for ms in self.manager.models.values() for mv in ms.ready()]
        infos = [_info(mv) for mv in routable]
        for link in self._links:
            self._send_snapshot(link, seq, routable, infos)
        return seq

    def _send_snapshot(self, link: _Link, seq: int, routable: list[ModelVersion],
                       infos: list[VersionInfo]) -> None:
        for mv in routable:
            if mv.uid not in link.pins:
                mv.hold()
                link.pins[mv.uid] = mv
            link.sent[mv.uid] = seq
        link.send(("snapshot", seq, self.manager.snapshot, infos))

    async def on_change(self) -> None:
        self.broadcast()

    async def seen_everywhere(self, seq: int) -> None:
        """Wait until every connected front end routes by snapshot `seq` (or later)."""
        async with self._acked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait_for(
                    lambda: all(link.acked >= seq for link in self._links)), ACK_TIMEOUT_S)

    # -- one front end ------------------------------------------------------------------

    def _connect(self) -> FrameLink:
        link = _Link()
        link.frames = FrameLink(partial(self._received, link), partial(self._drop, link))
        return link.frames

    def _received(self, link: _Link, message: Message) -> None:
        """A malformed message raises: FrameLink closes the connection, `_drop` logs it."""
        if message[0] == "hello":  # the first message: the front end's name
            link.name = str(message[1])
            self._links.add(link)
            routable = [mv for ms in self.manager.models.values() for mv in ms.ready()]
            self._send_snapshot(link, self._last_seq, routable, [_info(mv) for mv in routable])
            log.info("front end %s connected", link.name)
        else:
            self._dispatch(link, message)

    def _dispatch(self, link: _Link, message: Message) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(link, *message[1:])
        elif kind == "cancel":
            item = link.pending.pop(message[1], None)
            if item is not None:
                item.future.cancel()
        elif kind == "unpin":  # (uid, the snapshot the front end decided on)
            uid, seq = message[1], message[2]
            if link.sent.get(uid, 0) > seq:
                return  # a later snapshot offered it again: the front end decides anew
            link.sent.pop(uid, None)
            mv = link.pins.pop(uid, None)
            if mv is not None:
                mv.release()
        elif kind == "ack":
            link.acked = max(link.acked, message[1])
            self._spawn(self._notify_acked())
        elif kind in ("load", "unload"):
            self._spawn(self._control(link, kind, message[1], message[2]))
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _drop(self, link: _Link, exc: BaseException | None) -> None:
        """A front end went away: its requests are cancelled and its pins released."""
        if exc is not None and not isinstance(exc, OSError):
            log.error("front end %s: bad frame; closing its connection", link.name,
                      exc_info=exc)
        self._links.discard(link)
        for item in link.pending.values():
            item.future.cancel()
        link.pending.clear()
        for mv in link.pins.values():
            mv.release()
        link.pins.clear()
        log.info("front end %s disconnected", link.name)
        self._spawn(self._notify_acked())  # nobody waits on a front end that is gone

    async def _notify_acked(self) -> None:
        async with self._acked:
            self._acked.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests -----------------------------------------------------------------------

    def _submit(self, link: _Link, rid: int, uid: int, outputs: tuple[str, ...], wait: bool,
                ids: np.ndarray, lengths: list[int], starts: list[int],
                type_ids: np.ndarray | None, priority: int, caller: str | None,
                timeout_s: float) -> None:
        mv = link.pins.get(uid)
        if mv is None or mv.loaded is None:  # a front end routes only to what it pinned
            link.send(("error", rid, "ModelNotReady", "this model version is not loaded"))
            return
        encoded = Encoded(ids, lengths, starts, [0] * len(lengths), type_ids)
        # Callers are named by the front end that saw them: the engine keeps them apart.
        who = None if caller is None else (link.name, caller)
        item = WorkItem(encoded, frozenset(outputs), asyncio.get_running_loop().create_future(),
                        priority, who, timeout_s)
        link.pending[rid] = item
        item.future.add_done_callback(partial(self._answer, link, rid, item))
        batcher = mv.loaded.batcher
        try:
            if not batcher.offer([item], wait):
                self._spawn(_submit_waiting(batcher, item))
        except BertstreamError as exc:
            item.future.set_exception(exc)

    def _answer(self, link: _Link, rid: int, item: WorkItem, future: asyncio.Future[Any]) -> None:
        if link.pending.pop(rid, None) is None or future.cancelled():
            return  # cancelled by the front end, or its connection is gone
        exc = future.exception()
        if exc is None:
            link.send(("result", rid, item.queue_s, item.infer_s, future.result()))
        elif isinstance(exc, BertstreamError):
            link.send(("error", rid, type(exc).__name__, str(exc)))
        else:
            to_status(exc)  # logs the fault with its traceback
            link.send(("error", rid, "", "internal server error"))

    # -- control ------------------------------------------------------------------------

    async def _control(self, link: _Link, kind: str, rid: int, name: str) -> None:
        error: tuple[str, str] | None = None
        try:
            if kind == "load":
                await self.manager.load_model(name)
            else:
                await self.manager.unload_model(name)
        except BertstreamError as exc:
            error = (type(exc).__name__, str(exc))
        except Exception as exc:
            to_status(exc)
            error = ("", "internal server error")
        self._on_control()
        await self.seen_everywhere(self.broadcast())
        link.send(("reply", rid, error))


async def _submit_waiting(batcher: Any, item: WorkItem) -> None:
    """A request that waits for room in a full queue (streams: backpressure)."""
    try:
        await batcher.submit([item], wait=True)
    except BertstreamError as exc:
        if not item.future.done():
            item.future.set_exception(exc)


def _info(mv: ModelVersion) -> VersionInfo:
    loaded = mv.loaded
    assert loaded is not None
    return VersionInfo(mv.uid, mv.model, mv.version, str(mv.path),
                       loaded.config.SerializeToString(), tuple(loaded.labels), loaded.provider,
                       loaded.cost)
