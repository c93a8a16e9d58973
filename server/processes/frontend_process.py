"""A front-end process's view of the engine's models (`--frontends N`).

`EngineModels` routes, leases and tokenizes here, exactly as the single process does
(routing.Router over the same `ModelState`s), and sends each request's token ids to the
engine process, which batches every front end's requests together (engine_process.py). It follows
the engine's snapshots: a version routable here is pinned there until no request here uses
it any more. If the engine dies, requests in flight end `EngineUnavailable` (UNAVAILABLE),
nothing routes until a new engine has sent its snapshot, and the link reconnects by itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bertstream.v1.model_config_pb2 import ModelConfig

from ..engine.batcher import WorkItem
from ..engine.interface import Loaded
from ..engine.tokenizer import TextTokenizer
from ..errors import ENGINE_GONE, EngineUnavailable, error_by_name
from ..repository.routing import Router
from ..repository.snapshot import ModelRow, RepositorySnapshot, VersionRow
from ..repository.versions import ConfigState, ModelState, ModelVersion, State
from ..tracing import TRACE
from ..version_format import TOKENIZER_FILE
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

__all__ = ["EngineModels", "RemoteBatcher"]

log = logging.getLogger("bertstream.frontend")
RECONNECT_S = 0.1
HIGH_WATER = 4 * 1024 * 1024  # bytes queued to the engine before a sender waits


class RemoteBatcher:
    """A version's batcher as the pipeline sees it, in the engine process."""

    queued = 0

    def __init__(self, link: EngineModels, uid: int, connection: int) -> None:
        self._link = link
        self._uid = uid
        self._connection = connection  # uids name versions of one engine process only

    async def submit(self, items: Sequence[WorkItem], wait: bool) -> None:
        for item in items:
            await self._link.submit(self._uid, self._connection, item, wait)


class EngineModels(Router):
    """Models served by the engine process, routed from this front end."""

    def __init__(self, socket_path: Path, root: Path, name: str, default_model: str = "",
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(default_model)
        self.root = root
        self._socket = socket_path
        self._name = name
        self._on_change = on_change
        self._link: FrameLink | None = None
        self._connection = 0  # counts connections to an engine process
        self._rids = itertools.count(1)
        self._pending: dict[int, WorkItem] = {}
        self._replies: dict[int, asyncio.Future[tuple[str, str] | None]] = {}
        self._routable: dict[int, ModelVersion] = {}  # by uid
        self._broken: dict[int, str] = {}  # uids this process could not load, and why
        self._snapshots: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.first_snapshot = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unpins: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._link is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self._link is not None:
            self._link.close()

    # -- requests -----------------------------------------------------------------------

    async def submit(self, uid: int, connection: int, item: WorkItem, wait: bool) -> None:
        """Send one request to the engine. A version routed before the engine died is not
        the engine's now (a new engine numbers its versions afresh): refused, as in flight."""
        link = self._link
        if link is None or connection != self._connection:
            raise EngineUnavailable()
        rid = next(self._rids)
        self._pending[rid] = item
        enc = item.encoded
        link.send(Submit(rid, uid, tuple(item.outputs), wait, enc.ids, enc.lengths, enc.starts,
                         enc.type_ids, item.priority, item.caller, item.timeout_s,
                         TRACE.traceparent() if TRACE.on else None))
        item.future.add_done_callback(lambda f: self._cancelled(rid, f))
        await link.drain()  # waits only above HIGH_WATER bytes queued

    def _cancelled(self, rid: int, future: asyncio.Future[Any]) -> None:
        if (future.cancelled() and self._pending.pop(rid, None) is not None
                and self._link is not None):
            self._link.send(Cancel(rid))

    async def load_model(self, name: str) -> ModelVersion:
        await self._control(LoadModel, name)
        return self.resolve(name, 0)

    async def unload_model(self, name: str) -> None:
        await self._control(UnloadModel, name)

    async def _control(self, kind: type[LoadModel] | type[UnloadModel], name: str) -> None:
        """Ask the engine, the control plane's owner; it answers once every front end
        (this one included) routes by the result."""
        if self._link is None:
            raise EngineUnavailable()
        rid = next(self._rids)
        reply = self._replies[rid] = asyncio.get_running_loop().create_future()
        self._link.send(kind(rid, name))
        error = await asyncio.shield(reply)
        if error is not None:
            raise error_by_name(*error)

    # -- the link -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        applier = loop.create_task(self._apply_snapshots())
        try:
            while True:
                lost: asyncio.Future[BaseException | None] = loop.create_future()
                try:
                    _, link = await loop.create_unix_connection(
                        partial(FrameLink, self._received, partial(_settle, lost), HIGH_WATER),
                        str(self._socket))
                except OSError:
                    await asyncio.sleep(RECONNECT_S)
                    continue
                link.send(Hello(self._name))
                self._link = link
                self._connection += 1
                log.info("connected to the engine")
                try:
                    error = await lost
                    if error is not None and not isinstance(error, OSError):
                        log.error("bad frame from the engine; reconnecting", exc_info=error)
                finally:
                    link.close()
                    await self._lost()
        finally:
            applier.cancel()

    def _received(self, message: Message) -> None:
        match message:
            case Result(rid, queue_s, infer_s, rows):
                item = self._pending.pop(rid, None)
                if item is not None and not item.future.done():
                    item.queue_s, item.infer_s = queue_s, infer_s
                    item.future.set_result(rows)
            case Error(rid, name, text):
                item = self._pending.pop(rid, None)
                if item is not None and not item.future.done():
                    item.future.set_exception(error_by_name(name, text))
            case Snapshot():
                self._snapshots.put_nowait(message)
            case Reply(rid, error):
                reply = self._replies.pop(rid, None)
                if reply is not None and not reply.done():
                    reply.set_result(error)
            case _:
                raise ValueError(f"not a message for a front end: {type(message).__name__}")

    async def _lost(self) -> None:
        """The engine is gone: fail what is in flight, route nothing until a new one."""
        if self._link is None:
            return
        self._link = None
        if not self._closing:
            log.warning("lost the engine process; calls answer UNAVAILABLE until it is back")
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(EngineUnavailable())
        replies, self._replies = self._replies, {}
        for reply in replies.values():
            if not reply.done():
                reply.set_exception(EngineUnavailable())
        while not self._snapshots.empty():  # the old engine's news no longer counts
            self._snapshots.get_nowait()
        self._routable, self._broken = {}, {}  # its pins (and uids) died with it
        self._mirror(_unavailable(self.snapshot), {})
        await self._changed()

    async def _apply_snapshots(self) -> None:
        while True:
            message = await self._snapshots.get()
            try:
                await self._apply(message)
            except Exception:
                log.exception("cannot apply the engine's snapshot")

    async def _apply(self, message: Snapshot) -> None:
        seq, snapshot, infos = message
        link = self._link
        routable: dict[int, ModelVersion] = {}
        broken: dict[int, str] = {}
        for info in infos:
            mv = self._routable.get(info.uid)
            if mv is None and info.uid in self._broken:  # tried once: not every snapshot
                broken[info.uid] = self._broken[info.uid]
                continue
            if mv is None:
                try:
                    mv = await asyncio.to_thread(self._build, info)
                except Exception as exc:  # this process cannot serve it; the others may
                    log.error("model %s version %d: this front end cannot load its tokenizer: "
                              "%s", info.model, info.version, exc)
                    broken[info.uid] = self._broken[info.uid] = (
                        f"a front-end process cannot load its tokenizer: {exc}")
                    continue
            routable[info.uid] = mv
        if link is not self._link:  # the engine died while we built: its news is void
            return
        self._broken = {uid: why for uid, why in self._broken.items() if uid in broken}
        for uid in broken:  # never routed here: the engine may release it when it retires
            if link is not None:
                link.send(Unpin(uid, seq))
        for uid, mv in self._routable.items():
            if uid not in routable:
                self._retire(uid, mv, link, seq)
        self._routable = routable
        self._mirror(snapshot, routable, {
            (info.model, info.version): broken[info.uid] for info in infos
            if info.uid in broken})
        self.first_snapshot.set()
        if link is not None:
            link.send(Ack(seq))
        await self._changed()

    def _build(self, info: VersionInfo) -> ModelVersion:
        """This process's half of a version: its tokenizer and config (worker thread)."""
        config = ModelConfig.FromString(info.config)
        path = Path(info.path)
        tokenizer = TextTokenizer(path / TOKENIZER_FILE, config.max_sequence_length)
        mv = ModelVersion(info.model, info.version, path, state=State.READY, uid=info.uid)
        mv.loaded = Loaded(config, tokenizer, RemoteBatcher(self, info.uid, self._connection),
                           list(info.labels), info.provider, cost=info.cost)
        return mv

    def _retire(self, uid: int, mv: ModelVersion, link: FrameLink | None, seq: int) -> None:
        """No new requests here; the engine may release it once the last one here ends
        (`seq`: the snapshot that retired it here)."""
        mv.transition(State.UNLOADING, "retired by the engine")

        async def unpin() -> None:
            await mv.idle()
            if link is not None and link is self._link:
                link.send(Unpin(uid, seq))

        task = asyncio.get_running_loop().create_task(unpin())
        self._unpins.add(task)  # a reference keeps it alive
        task.add_done_callback(self._unpins.discard)

    def _mirror(self, snapshot: RepositorySnapshot, routable: dict[int, ModelVersion],
                broken: dict[tuple[str, int], str] | None = None) -> None:
        """Rebuild `models` from the engine's rows: READY rows route to their version here;
        the others carry their state and reason, so errors read as in one process."""
        by_key = {(mv.model, mv.version): mv for mv in routable.values()}
        models: dict[str, ModelState] = {}
        for row in snapshot.models:
            ms = models[row.name] = ModelState(row.name, config=ConfigState(error=row.error))
            for vr in row.versions:
                mv = by_key.get((row.name, vr.version)) if vr.state is State.READY else None
                ms.versions[vr.version] = mv or ModelVersion(
                    row.name, vr.version, Path(), state=vr.state if vr.state is not State.READY
                    else State.UNAVAILABLE,
                    reason=(broken or {}).get((row.name, vr.version)) or vr.reason or ENGINE_GONE)
        for name in snapshot.removed:
            models[name] = ModelState(name, config=ConfigState(removed=True))
        self.models = models
        self.snapshot = snapshot

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()


def _settle(future: asyncio.Future[BaseException | None], exc: BaseException | None) -> None:
    """The link ended, with what ended it (None: the engine closed it)."""
    if not future.done():
        future.set_result(exc)


def _unavailable(snapshot: RepositorySnapshot) -> RepositorySnapshot:
    """The last snapshot with every READY version UNAVAILABLE: what a dead engine serves."""
    rows = tuple(ModelRow(m.name, m.error, tuple(
        VersionRow(v.model, v.version, State.UNAVAILABLE, ENGINE_GONE)
        if v.state is State.READY else v for v in m.versions)) for m in snapshot.models)
    return RepositorySnapshot(rows, snapshot.removed, snapshot.default_model)
