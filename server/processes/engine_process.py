"""The engine process (`--frontends N`): the models, their batchers and sessions, and the
control plane, serving front-end processes over a unix socket (link.py, messages.py).

Contract:
- One `ModelManager` here owns every model (repository scans, LoadModel / UnloadModel, poll
  mode). After each change the engine sends every front end a snapshot: the repository rows
  and the READY versions it may route to, each named by its `uid`. A front end acknowledges
  a snapshot once it routes by it; LoadModel and UnloadModel answer only when every front end
  has, so a swap is seen by all of them at once.
- Cross-process leases: a version sent to a front end is held (`ModelVersion.hold`) for that
  front end until it says `Unpin` (it routes elsewhere and its last request on the version
  ended) or its connection closes. A retired version's session is released only then, so a
  request finishes on the version it started on, whichever process it entered.
- Requests: `Submit` carries one request's packed token ids for a version uid, with its
  priority level, its caller and its queue timeout (the batcher's scheduler decides across
  every front end's callers); the answer is its rows per output (`Result`) or its error by
  class name (`Error`). `Cancel` drops it. Every message is a record in messages.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..engine.batch import Encoded
from ..engine.batcher import WorkItem
from ..errors import BertstreamError, to_status
from ..repository.manager import ModelManager
from ..repository.versions import ModelVersion
from ..tracing import TRACE
from .link import FrameLink
from .messages import (
    Ack,
    Cancel,
    Error,
    Hello,
    LoadModel,
    Message,
    Reply,
    Result,
    Snapshot,
    Submit,
    UnloadModel,
    Unpin,
    VersionInfo,
)

__all__ = ["Engine"]

log = logging.getLogger("bertstream.engine")
ACK_TIMEOUT_S = 30.0  # a front end that does not acknowledge a snapshot in this long is stuck


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
        link.send(Snapshot(seq, self.manager.snapshot, infos))

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
        """One message from a front end (messages.py). A malformed one raises: FrameLink
        closes the connection, `_drop` logs it."""
        match message:
            case Hello(name):  # the first message: the front end's name
                link.name = str(name)
                self._links.add(link)
                routable = [mv for ms in self.manager.models.values() for mv in ms.ready()]
                self._send_snapshot(link, self._last_seq, routable,
                                    [_info(mv) for mv in routable])
                log.info("front end %s connected", link.name)
            case Submit():
                self._submit(link, message)
            case Cancel(rid):
                item = link.pending.pop(rid, None)
                if item is not None:
                    item.future.cancel()
            case Unpin(uid, seq):
                if link.sent.get(uid, 0) > seq:
                    return  # a later snapshot offered it again: the front end decides anew
                link.sent.pop(uid, None)
                mv = link.pins.pop(uid, None)
                if mv is not None:
                    mv.release()
            case Ack(seq):
                link.acked = max(link.acked, seq)
                self._spawn(self._notify_acked())
            case LoadModel() | UnloadModel():
                self._spawn(self._control(link, message))
            case _:
                raise ValueError(f"not a message for the engine: {type(message).__name__}")

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

    def _submit(self, link: _Link, message: Submit) -> None:
        rid = message.rid
        mv = link.pins.get(message.uid)
        if mv is None or mv.loaded is None:  # a front end routes only to what it pinned
            link.send(Error(rid, "ModelNotReady", "this model version is not loaded"))
            return
        encoded = Encoded(message.ids, message.lengths, message.starts,
                          [0] * len(message.lengths), message.type_ids)
        # Callers are named by the front end that saw them: the engine keeps them apart.
        who = None if message.caller is None else (link.name, message.caller)
        item = WorkItem(encoded, frozenset(message.outputs),
                        asyncio.get_running_loop().create_future(), message.priority, who,
                        message.timeout_s,
                        trace=TRACE.remote(message.trace) if message.trace else None)
        link.pending[rid] = item
        item.future.add_done_callback(partial(self._answer, link, rid, item))
        batcher = mv.loaded.batcher
        try:
            if not batcher.offer([item], message.wait):
                self._spawn(_submit_waiting(batcher, item))
        except BertstreamError as exc:
            item.future.set_exception(exc)

    def _answer(self, link: _Link, rid: int, item: WorkItem, future: asyncio.Future[Any]) -> None:
        if link.pending.pop(rid, None) is None or future.cancelled():
            return  # cancelled by the front end, or its connection is gone
        exc = future.exception()
        if exc is None:
            link.send(Result(rid, item.queue_s, item.infer_s, future.result()))
        elif isinstance(exc, BertstreamError):
            link.send(Error(rid, type(exc).__name__, str(exc)))
        else:
            to_status(exc)  # logs the fault with its traceback
            link.send(Error(rid, "", "internal server error"))

    # -- control ------------------------------------------------------------------------

    async def _control(self, link: _Link, message: LoadModel | UnloadModel) -> None:
        error: tuple[str, str] | None = None
        try:
            if isinstance(message, LoadModel):
                await self.manager.load_model(message.name)
            else:
                await self.manager.unload_model(message.name)
        except BertstreamError as exc:
            error = (type(exc).__name__, str(exc))
        except Exception as exc:
            to_status(exc)
            error = ("", "internal server error")
        self._on_control()
        await self.seen_everywhere(self.broadcast())
        link.send(Reply(message.rid, error))


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
