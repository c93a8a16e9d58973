"""The engine and a front end's view of it in one process, over a real unix socket: frames,
routing by the engine's snapshots, leases held across the link, cancels, and a lost engine.
The process-level promises (kills, restarts, SIGTERM) are in tests/multiprocess."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.batcher import WorkItem
from bertstream.server.engine.loader import OnnxLoader
from bertstream.server.engine.workers import Workers
from bertstream.server.errors import EngineUnavailable, ModelNotFound, ModelNotReady
from bertstream.server.pipeline.inference import EmbedQuery, Limits, Pipeline
from bertstream.server.processes.engine_process import Engine
from bertstream.server.processes.frontend_process import EngineModels
from bertstream.server.processes.link import FrameLink, Message, encode_frame
from bertstream.server.repository.manager import ModelManager
from bertstream.server.repository.versions import State

TEXTS = ("今天股市大涨", "央行宣布降准", "hello")


def _run(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    def run(tmp_path: Path, model_repository: Path) -> None:
        asyncio.run(asyncio.wait_for(test(tmp_path, model_repository), 60))
    run.__name__ = test.__name__
    return run


class Link:
    """An engine over a copy of the session's repository and one front end connected to it."""

    def __init__(self, tmp_path: Path, repository: Path) -> None:
        self.root = Path(shutil.copytree(repository, tmp_path / "repo"))
        self.socket = tmp_path / "engine.sock"
        self.loader = OnnxLoader(RuntimeOptions(device="cpu", intra_op_threads=1))
        self.manager = ModelManager(self.root, self.loader, on_change=self._changed)
        self.engine = Engine(self.manager, on_control=lambda: None)
        self.front = EngineModels(self.socket, self.root, "frontend-0")
        self.pool = Workers(2, "tokenize")

    async def _changed(self) -> None:
        await self.engine.on_change()

    async def __aenter__(self) -> Link:
        await self.manager.load_all()
        await self.engine.listen(self.socket)
        self.front.start()
        await self.front.first_snapshot.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.front.close()
        await self.engine.close()
        await self.manager.close()
        self.pool.close()

    def pipeline(self, models: object) -> Pipeline:
        return Pipeline(models, Limits(), self.pool)  # type: ignore[arg-type]


async def _embed(pipeline: Pipeline, version: int = 0) -> np.ndarray:
    result = await pipeline.embed(EmbedQuery("tiny-embed", version, TEXTS), wait=True)
    assert isinstance(result.vectors, np.ndarray)
    return result.vectors


async def _receiver(on_message: Callable[[Message], None],
                    on_lost: Callable[[BaseException | None], None]
                    ) -> tuple[socket.socket, FrameLink]:
    """A FrameLink on one end of a socket pair, and the other end."""
    here, there = socket.socketpair()
    _, link = await asyncio.get_running_loop().create_unix_connection(
        lambda: FrameLink(on_message, on_lost), sock=there)
    return here, link


@pytest.mark.parametrize("type_ids", [False, True])
def test_frames_carry_arrays_out_of_band_and_back(type_ids: bool) -> None:
    async def go() -> None:
        ids = np.arange(1000, dtype=np.int64)
        vectors = [np.ones((3, 4), np.float32), np.zeros((0, 4), np.float32)]
        message = ("submit", 7, {"a": ids}, vectors, ids if type_ids else None, [1, 2])
        got: list[Message] = []
        lost = asyncio.get_running_loop().create_future()
        here, _ = await _receiver(got.append, lost.set_result)
        _, sender = await asyncio.get_running_loop().create_unix_connection(
            lambda: FrameLink(print, print), sock=here)
        sender.send(message)  # one loop turn: both leave in one write
        sender.send(("ack", 3))
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        sender.close()
        assert await lost is None  # closed by its peer
        kind, rid, arrays, lists, types, plain = got[0]
        assert (kind, rid, plain) == ("submit", 7, [1, 2])
        np.testing.assert_array_equal(arrays["a"], ids)
        assert not arrays["a"].flags.writeable  # a view of the received bytes, not a copy
        assert [v.shape for v in lists] == [(3, 4), (0, 4)]
        assert (types is None) is not type_ids
        assert got[1] == ("ack", 3)

    asyncio.run(go())


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_frames_split_anywhere_arrive_whole_and_in_order(chunk: int) -> None:
    async def go() -> None:
        messages = [("result", i, np.full((i, 8), i, np.float32)) for i in range(5)]
        data = b"".join(bytes(p) for m in messages for p in encode_frame(m))
        got: list[Message] = []
        link = FrameLink(got.append, print)
        for at in range(0, len(data), chunk):
            link.data_received(data[at:at + chunk])
        assert [m[1] for m in got] == list(range(5))
        for (_, i, rows) in got:
            np.testing.assert_array_equal(rows, np.full((i, 8), i, np.float32))

    asyncio.run(go())


@pytest.mark.parametrize("garbage", [struct.pack("<II", 5, 0) + b"junk!",
                                     struct.pack("<II", 0, 1) + struct.pack("<Q", 1 << 40)])
def test_a_malformed_frame_ends_the_link_with_its_error(garbage: bytes) -> None:
    async def go() -> None:
        lost = asyncio.get_running_loop().create_future()
        here, _ = await _receiver(print, lost.set_result)
        here.sendall(garbage)
        error = await asyncio.wait_for(lost, 5)
        assert error is not None and not isinstance(error, OSError)
        assert here.recv(1) == b""  # closed
        here.close()

    asyncio.run(go())


@_run
async def test_front_end_answers_as_the_engine_process_would(tmp_path: Path,
                                                            repository: Path) -> None:
    async with Link(tmp_path, repository) as link:
        here = await _embed(link.pipeline(link.manager))
        there = await _embed(link.pipeline(link.front))
        np.testing.assert_array_equal(here, there)
        assert link.front.snapshot == link.manager.snapshot
        with pytest.raises(ModelNotFound):
            link.front.resolve("no-such-model", 0)


@_run
async def test_a_version_leased_by_a_front_end_keeps_its_session_until_the_lease_ends(
        tmp_path: Path, repository: Path) -> None:
    async with Link(tmp_path, repository) as link:
        engine_mv = link.manager.resolve("tiny-embed", 0)
        with link.front.lease("tiny-embed", 0) as mv:
            await link.manager.unload_model("tiny-embed")
            for _ in range(50):  # the front end hears of it...
                if link.front.models["tiny-embed"].versions[1].state is not State.READY:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(ModelNotReady):  # ...routes nothing new to it...
                link.front.resolve("tiny-embed", 0)
            await asyncio.sleep(0.2)
            assert engine_mv.loaded is not None  # ...and the engine keeps its session
            assert mv.loaded is not None
            # A request that started on it still runs there.
            encoded = mv.loaded.tokenizer.encode(list(TEXTS), truncate=False)
            item = WorkItem(encoded, frozenset({"cls_layer1"}),
                            asyncio.get_running_loop().create_future())
            await mv.loaded.batcher.submit([item], wait=True)
            rows = await item.future
            assert rows["cls_layer1"].shape[0] == len(TEXTS)
        await asyncio.wait_for(link.manager.drained(), 5)  # released once the lease ended
        assert engine_mv.loaded is None and engine_mv.state is State.UNAVAILABLE


@_run
async def test_a_cancelled_request_is_dropped_by_the_engine(tmp_path: Path,
                                                           repository: Path) -> None:
    async with Link(tmp_path, repository) as link:
        mv = link.front.resolve("tiny-embed", 0)
        assert mv.loaded is not None
        encoded = mv.loaded.tokenizer.encode(list(TEXTS), truncate=False)
        item = WorkItem(encoded, frozenset({"cls_layer1"}),
                        asyncio.get_running_loop().create_future())
        await mv.loaded.batcher.submit([item], wait=True)
        item.future.cancel()
        await asyncio.sleep(0.2)
        assert not link.front._pending
        assert all(not link_.pending for link_ in link.engine._links)


@_run
async def test_a_lost_engine_fails_what_is_in_flight_unavailable(tmp_path: Path,
                                                                 repository: Path) -> None:
    async with Link(tmp_path, repository) as link:
        mv = link.front.resolve("tiny-embed", 0)
        assert mv.loaded is not None
        encoded = mv.loaded.tokenizer.encode(list(TEXTS), truncate=False)
        futures = []
        for _ in range(20):
            item = WorkItem(encoded, frozenset({"cls_layer1"}),
                            asyncio.get_running_loop().create_future())
            await mv.loaded.batcher.submit([item], wait=True)
            futures.append(item.future)
        await link.engine.close()  # as if the engine process died
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, EngineUnavailable) for r in failed)
        with pytest.raises(ModelNotReady):
            link.front.resolve("tiny-embed", 0)
        assert not link.front.connected
        assert link.front.snapshot.model("tiny-embed").versions[0].state is State.UNAVAILABLE


@_run
async def test_load_model_through_a_front_end_answers_once_it_routes_there(
        tmp_path: Path, repository: Path) -> None:
    async with Link(tmp_path, repository) as link:
        await link.front.unload_model("tiny-embed")
        with pytest.raises(ModelNotReady):  # seen here before the call returned
            link.front.resolve("tiny-embed", 0)
        mv = await link.front.load_model("tiny-embed")
        assert mv.state is State.READY and mv.loaded is not None
        np.testing.assert_array_equal(await _embed(link.pipeline(link.front)),
                                      await _embed(link.pipeline(link.manager)))
        with pytest.raises(ModelNotFound):
            await link.front.load_model("no-such-model")


@_run
async def test_a_version_a_front_end_cannot_load_is_not_routed_there_nor_held(
        tmp_path: Path, repository: Path) -> None:
    link = Link(tmp_path, repository)

    def broken(info: object) -> object:
        raise OSError("tokenizer.json: permission denied")

    link.front._build = broken  # type: ignore[method-assign]
    async with link:  # the front end still acknowledges: LoadModel does not wait on it
        with pytest.raises(ModelNotReady, match="cannot load its tokenizer"):
            link.front.resolve("tiny-embed", 0)
        engine_mv = link.manager.resolve("tiny-embed", 0)
        with pytest.raises(ModelNotReady, match="cannot load its tokenizer"):  # at once
            await asyncio.wait_for(link.front.load_model("tiny-news"), 10)
        await link.manager.unload_model("tiny-embed")
        await asyncio.wait_for(link.manager.drained(), 5)  # no pin left behind
        assert engine_mv.loaded is None


def test_the_engine_closes_a_connection_that_sends_a_malformed_frame(
        tmp_path: Path, model_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with Link(tmp_path, model_repository) as link:
            reader, writer = await asyncio.open_unix_connection(str(link.socket))
            writer.write(struct.pack("<II", 5, 0) + b"junk!")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the engine
            writer.close()
            assert link.front.connected  # the other front end is not disturbed
            assert len(link.engine._links) == 1

    with caplog.at_level(logging.ERROR, logger="bertstream.engine"):
        asyncio.run(asyncio.wait_for(go(), 60))
    assert "bad frame; closing its connection" in caplog.text
