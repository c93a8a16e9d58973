"""client/windowed.py against a fake bidirectional call: the window, the order, and what a
broken stream leaves unanswered. No server, no timed sleeps."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from bertstream.client.messages import ClientError
from bertstream.client.windowed import BlockingStreams, WindowedStream


@dataclass
class Message:
    request_id: str


_WAKE = object()  # what done_writing puts in the answer queue


class FakeCall:
    """An echo server: each written request is answered in order, or as `answer` says
    (None: held back). `end_after`: the stream ends (EOF) once that many are answered;
    `fail_after`: it fails with `failure` then instead."""

    def __init__(self, answer: Callable[[Message], Message | None] | None = None,
                 end_after: int | None = None, fail_after: int | None = None,
                 failure: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.answer = answer or (lambda request: Message(request.request_id))
        self.end_after = end_after
        self.fail_after = fail_after
        self.failure = failure
        self.written: list[str] = []
        self.read_count = 0
        self.most_in_flight = 0
        self.half_closed = False
        self.cancelled = False
        self._answers: asyncio.Queue[Any] = asyncio.Queue()

    async def write(self, request: Message) -> None:
        if self.cancelled:
            raise asyncio.InvalidStateError("RPC already finished")
        self.written.append(request.request_id)
        self.most_in_flight = max(self.most_in_flight, len(self.written) - self.read_count)
        response = self.answer(request)
        if response is not None:
            self._answers.put_nowait(response)

    async def done_writing(self) -> None:
        self.half_closed = True
        self._answers.put_nowait(_WAKE)  # a read already waiting must see the half-close

    async def read(self) -> Any:
        while True:
            if self.fail_after is not None and self.read_count == self.fail_after:
                raise grpc.aio.AioRpcError(self.failure, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), details="replica went away")
            if self.read_count == self.end_after or (
                    self.half_closed and self.read_count == len(self.written)):
                return grpc.aio.EOF
            response = await self._answers.get()
            if response is _WAKE:
                continue  # re-check: half-closed, or answers still to come
            self.read_count += 1
            return response

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _requests(n: int) -> list[tuple[int, Message]]:
    return [(i, Message(str(i))) for i in range(n)]


async def _collect(stream: WindowedStream[Any]) -> list[Any]:
    async with stream:
        return [tag async for tag, _ in stream]


def test_answers_come_in_order_with_at_most_window_in_flight() -> None:
    async def run() -> None:
        call = FakeCall()
        assert await _collect(WindowedStream(call, _requests(50), window=4)) == list(range(50))
        assert call.most_in_flight == 4
        assert call.half_closed and call.cancelled  # leaving `async with` ends the call

    asyncio.run(run())


def test_the_source_is_read_only_when_a_slot_is_free() -> None:
    """A source that hands out work (the feed's queue) must not hand it to a full window."""
    async def run() -> None:
        call = FakeCall()
        in_flight_when_pulled: list[int] = []

        async def source() -> AsyncIterator[tuple[int, Message]]:
            for i in range(20):
                in_flight_when_pulled.append(len(call.written) - call.read_count)
                yield i, Message(str(i))

        assert await _collect(WindowedStream(call, source(), window=3)) == list(range(20))
        assert max(in_flight_when_pulled) < 3

    asyncio.run(run())


def test_a_source_that_waits_for_an_answer_does_not_deadlock() -> None:
    """Sending and reading run side by side: the next request may depend on an answer."""
    async def run() -> None:
        answered = asyncio.Event()

        async def source() -> AsyncIterator[tuple[int, Message]]:
            yield 0, Message("0")
            await answered.wait()
            yield 1, Message("1")

        stream = WindowedStream(FakeCall(), source(), window=4)
        tags = []
        async with stream:
            async for tag, _ in stream:
                tags.append(tag)
                answered.set()
        assert tags == [0, 1]

    asyncio.run(run())


def test_a_stream_that_ends_early_leaves_its_unanswered_requests() -> None:
    async def run() -> None:
        stream = WindowedStream(FakeCall(end_after=3), _requests(10), window=5)
        tags = []
        with pytest.raises(ClientError) as err:
            async with stream:
                async for tag, _ in stream:
                    tags.append(tag)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert tags == [0, 1, 2]
        assert stream.unanswered() == [3, 4, 5, 6, 7]

    asyncio.run(run())


def test_ending_before_the_source_runs_out_is_a_failure_too() -> None:
    """Everything sent was answered, but the server closed before we half-closed."""
    async def run() -> None:
        stream = WindowedStream(FakeCall(end_after=2), _requests(2) + _requests(1), window=2)
        with pytest.raises(ClientError, match="ended early"):
            await _collect(stream)

    asyncio.run(run())


def test_a_grpc_failure_is_a_client_error_with_its_code() -> None:
    async def run() -> None:
        call = FakeCall(fail_after=2, failure=grpc.StatusCode.RESOURCE_EXHAUSTED)
        stream = WindowedStream(call, _requests(6), window=3)
        with pytest.raises(ClientError) as err:
            await _collect(stream)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.message == "replica went away"
        assert stream.unanswered() == [2, 3, 4]
        assert call.cancelled

    asyncio.run(run())


def test_an_answer_out_of_order_is_refused() -> None:
    async def run() -> None:
        swapped = {"0": "1", "1": "0"}
        call = FakeCall(answer=lambda r: Message(swapped.get(r.request_id, r.request_id)))
        with pytest.raises(ClientError, match="out of order") as err:
            await _collect(WindowedStream(call, _requests(4), window=4))
        assert err.value.code == grpc.StatusCode.INTERNAL

    asyncio.run(run())


def test_a_source_that_raises_surfaces_its_own_error_while_answers_are_due() -> None:
    async def run() -> None:
        def source() -> Iterator[tuple[int, Message]]:
            yield 0, Message("0")
            raise ValueError("pooling must be one of ...")

        call = FakeCall(answer=lambda r: None)  # nothing is ever answered
        with pytest.raises(ValueError, match="pooling"):
            await _collect(WindowedStream(call, source(), window=4))
        assert call.cancelled

    asyncio.run(run())


def test_leaving_early_cancels_the_writer_and_the_call() -> None:
    async def run() -> None:
        call = FakeCall()
        stream = WindowedStream(call, _requests(100), window=8)
        async with stream:
            async for tag, _ in stream:
                if tag == 2:
                    break
        assert call.cancelled and not call.half_closed
        assert len(call.written) <= 3 + 8

    asyncio.run(run())


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        WindowedStream(FakeCall.__new__(FakeCall), [], window=0)


class _NoChannel:
    async def close(self) -> None:
        pass


def test_blocking_streams_run_the_same_core_for_a_blocking_caller() -> None:
    """The item iterator blocks until the caller has read the previous answer: it is read on
    a thread of its own, so neither the caller nor the shared loop waits on it."""
    streams = BlockingStreams(_NoChannel)
    feedback: queue.Queue[int] = queue.Queue()
    feedback.put(0)

    def items() -> Iterator[tuple[int, Message]]:
        for _ in range(5):
            i = feedback.get(timeout=30)
            yield i, Message(str(i))

    calls: list[FakeCall] = []

    def start(channel: Any) -> FakeCall:
        calls.append(FakeCall())
        return calls[-1]

    tags = []
    for tag, response in streams.stream(start, items(), window=2):
        assert response.request_id == str(tag)
        tags.append(tag)
        feedback.put(tag + 1)
    assert tags == [0, 1, 2, 3, 4]
    assert calls[0].cancelled
    with pytest.raises(ClientError) as err:
        list(streams.stream(lambda channel: FakeCall(fail_after=1), _requests(3), window=2))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    streams.close()


class ReplacedStatusCall(FakeCall):
    """A call the server ended UNAUTHENTICATED while a write was still being sent: grpc.aio
    (grpc/grpc#36066) then reads it back as INTERNAL "Internal error from Core"."""

    def __init__(self) -> None:
        super().__init__(fail_after=0, failure=grpc.StatusCode.INTERNAL)
        self._done: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    async def details(self) -> str:
        return "unknown bearer token"

    async def read(self) -> Any:
        for callback in self._done:  # the call ends with the server's status first
            callback(self)
        return await super().read()


def test_the_status_the_call_ended_with_wins_over_grpcs_later_internal() -> None:
    async def main() -> None:
        with pytest.raises(ClientError) as err:
            await _collect(WindowedStream(ReplacedStatusCall(), _requests(4), window=4))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "unknown bearer token" in str(err.value)

    asyncio.run(main())


def test_a_caller_that_stops_early_leaves_only_a_daemon_reader_behind() -> None:
    """The caller takes one answer and stops while its iterator blocks for good: the stream
    closes at once and the thread still blocked in next() cannot hold the process at exit."""
    import threading

    streams = BlockingStreams(_NoChannel)
    never: queue.Queue[int] = queue.Queue()

    def items() -> Iterator[tuple[int, Message]]:
        yield 0, Message("0")
        never.get()  # blocks until the test ends
        yield 1, Message("1")

    calls: list[FakeCall] = []

    def start(channel: Any) -> FakeCall:
        calls.append(FakeCall())
        return calls[-1]

    answers = streams.stream(start, items(), window=2)
    assert next(answers)[0] == 0
    answers.close()  # the caller stops early
    assert calls[0].cancelled
    readers = [t for t in threading.enumerate() if t.name == "bertstream-items"]
    assert readers and all(t.daemon for t in readers)
    never.put(0)  # let the reader finish
    streams.close()
