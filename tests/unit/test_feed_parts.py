"""The feed's parts without a server: resuming an output file (feed_input.py), the work queue
(feed_work.py), and what a failed message turns into (feed.py with retry.py)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import grpc
import pytest
from bertstream.client.feed import FeedError, FeedOptions, FeedReport, _Feed
from bertstream.client.feed_input import Item, resume
from bertstream.client.feed_output import Output
from bertstream.client.feed_work import Work
from bertstream.client.messages import ClientError
from bertstream.client.retry import MAX_ITEM_ATTEMPTS
from bertstream.v1 import bertstream_pb2 as pb


def _items(n: int) -> list[Item]:
    return [Item(json.dumps(i), i, f"text {i}") for i in range(n)]


def test_resume_keeps_whole_lines_and_cuts_a_partial_one(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = "".join(json.dumps({"id": i, "embedding": [0.5]}) + "\n" for i in (1, "b", 3))
    out.write_text(good + '{"id": 4, "embe', encoding="utf-8")
    assert resume(out) == {"1", '"b"', "3"}
    assert out.read_text(encoding="utf-8") == good
    assert resume(tmp_path / "missing.jsonl") == set()


def test_resume_refuses_a_damaged_line_and_skips_blank_ones(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1}\n\n{"id": 2}\n', encoding="utf-8")
    assert resume(out) == {"1", "2"}
    out.write_text('{"id": 1}\nnot json\n{"id": 2}\n', encoding="utf-8")
    with pytest.raises(FeedError, match=r"out\.jsonl:2: not an answer line"):
        resume(out)


def test_work_sends_retries_first_and_split_items_alone() -> None:
    async def run() -> None:
        work = Work(iter(_items(5)), batch_size=2)
        first = await work.take()
        assert [i.id for i in first] == [0, 1]
        for item in first:
            item.solo = True
        await work.settle(first, retry=True)
        assert [i.id for i in await work.take()] == [0]
        assert [i.id for i in await work.take()] == [1]
        rest = await work.take()
        assert [i.id for i in rest] == [2, 3]
        await work.settle(rest, retry=True)
        assert [i.id for i in await work.take()] == [2, 3]  # regrouped: neither is solo
        last = await work.take()
        assert [i.id for i in last] == [4]

        async def settle_later(batches: list[list[Item]]) -> None:
            await asyncio.sleep(0.05)
            for batch in batches:
                await work.settle(batch)

        # Nothing left to send, but 5 items in flight: take waits until they are settled.
        waiter = asyncio.create_task(work.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await settle_later([[Item("x", 0, "")]] * 5)
        assert await waiter is None

    asyncio.run(run())


def _feed(tmp_path: Path, work: Work) -> tuple[_Feed, io.StringIO, FeedReport]:
    out = io.StringIO()
    report = FeedReport()
    options = FeedOptions(input=tmp_path / "in", output=tmp_path / "out")
    return _Feed(options, Output(out, True, set(), report), work, report), out, report


def test_a_retryable_message_error_is_retried_until_attempts_run_out(tmp_path: Path) -> None:
    async def run() -> None:
        work = Work(iter(_items(2)), batch_size=2)
        feed, out, report = _feed(tmp_path, work)
        error = ClientError(grpc.StatusCode.UNAVAILABLE, "try again")
        for attempt in range(1, MAX_ITEM_ATTEMPTS + 1):
            batch = await work.take()
            assert batch is not None and len(batch) == 2
            assert await feed._failed(batch, error) is True
            if attempt < MAX_ITEM_ATTEMPTS:
                assert out.getvalue() == ""
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["error"]["code"] for line in lines] == ["UNAVAILABLE"] * 2
        assert report.errors == 2 and await work.take() is None

    asyncio.run(run())


def test_an_item_error_splits_the_message_then_answers_the_bad_text(tmp_path: Path) -> None:
    async def run() -> None:
        work = Work(iter(_items(3)), batch_size=3)
        feed, out, _ = _feed(tmp_path, work)
        bad = ClientError(grpc.StatusCode.INVALID_ARGUMENT, "texts[0] is too long")
        batch = await work.take()
        assert await feed._failed(batch, bad) is False
        assert out.getvalue() == "" and all(i.solo for i in batch)
        single = await work.take()
        assert len(single) == 1
        await feed._failed(single, bad)
        line = json.loads(out.getvalue())
        assert line == {"id": 0, "error": {"code": "INVALID_ARGUMENT",
                                           "message": "texts[0] is too long"}}
        with pytest.raises(FeedError, match="NOT_FOUND"):
            await feed._failed(await work.take(),
                               ClientError(grpc.StatusCode.NOT_FOUND, "no model x"))

    asyncio.run(run())


class _AgedOut(grpc.RpcError):
    """What grpc core raises on the streams of a connection the server aged out
    (max_connection_age, then its grace period)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "max connection age"


class _AgeingCall:
    """An EmbedStream whose connection is aged out after it answered `answers` messages."""

    def __init__(self, answers: int) -> None:
        self._sent: asyncio.Queue[pb.EmbedRequest | None] = asyncio.Queue()
        self._left = answers

    async def write(self, request: pb.EmbedRequest) -> None:
        await self._sent.put(request)

    async def done_writing(self) -> None:
        await self._sent.put(None)

    async def read(self) -> object:
        if self._left == 0:
            raise _AgedOut()
        request = await self._sent.get()
        if request is None:
            return grpc.aio.EOF
        self._left -= 1
        return pb.EmbedResponse(request_id=request.request_id, embeddings=[
            pb.Embedding(values=[1.0], shape=[1]) for _ in request.texts])

    def cancel(self) -> bool:
        return True


def test_streams_cut_by_connection_ageing_cost_the_texts_no_attempts(tmp_path: Path) -> None:
    """Every stream answers one message and is then aged out with the rest of its window in
    flight: the last messages are cut more often than MAX_ITEM_ATTEMPTS, yet every id is
    answered once, nothing is split, and no backoff is slept."""
    calls: list[_AgeingCall] = []

    class Stub:
        def EmbedStream(self, **_: object) -> _AgeingCall:
            calls.append(_AgeingCall(answers=1))
            return calls[-1]

    async def run() -> None:
        items = _items(24)
        work = Work(iter(items), batch_size=2)
        out = io.StringIO()
        report = FeedReport()
        options = FeedOptions(input=tmp_path / "in", output=tmp_path / "out", window=12)
        feed = _Feed(options, Output(out, True, set(), report), work, report)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(feed.stream(Stub()), 30)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert sorted(line["id"] for line in lines) == list(range(24))
        assert report.errors == 0 and all("embedding" in line for line in lines)
        assert report.stream_retries > MAX_ITEM_ATTEMPTS
        assert all(item.attempts == 0 and not item.solo for item in items)
        assert asyncio.get_running_loop().time() - started < report.stream_retries * 0.05

    asyncio.run(run())
