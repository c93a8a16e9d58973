"""The windowed, ordered bidirectional stream, written once for every client stream:
`AsyncBertClient.encode_stream`, `BertClient.encode_stream` / `classify_stream` and the bulk
feed (feed.py).

Contract of `WindowedStream`: at most `window` requests are in flight (sent, not yet
answered). A request is taken from the source only once a slot is free, so a source that hands
out work (the feed's queue) never hands it to a stream that cannot send it yet. A writer task
sends; the consumer reads. Responses come in request order (the server's ordered_stream
promises it, and each response's request_id is checked against the request it answers) and
are yielded with the caller's tag for that request. gRPC failures raise ClientError with their
code; a stream that ends before answering all it was sent, or before the source ran out,
raises ClientError(UNAVAILABLE); `unanswered()` then gives the tags of what was lost, for the
feed to send again. Leaving the `async with` cancels the writer and the call: the stream owns
the call it is given.

Why an async core with a blocking adapter, not the reverse: the feed runs many streams on one
event loop and its source awaits the work queue, which only an async core serves; a blocking
core would need a thread per stream and a thread-safe queue. So `BertClient` runs this same
core through `BlockingStreams`: one event-loop thread for the process, a grpc.aio channel per
client (opened at its first stream), and each stream's items read on a thread of the stream's
own, as grpc's blocking API did, so an item iterator that blocks (on input, or on an answer its
caller has yet to read) stalls nothing else. The price: a BertClient that streams holds a
second channel beside the one its unary calls use.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc

from .messages import ClientError

__all__ = ["BidiCall", "BlockingStreams", "WindowedStream"]

T = TypeVar("T")
R = TypeVar("R")
_END: Any = object()  # the end of a source, or of a stream, across a thread


class BidiCall(Protocol):
    """What WindowedStream uses of a grpc.aio stream-stream call (tests pass a fake)."""

    async def write(self, request: Any) -> None: ...
    async def done_writing(self) -> None: ...
    async def read(self) -> Any: ...
    def cancel(self) -> bool: ...


Requests = Iterable[tuple[T, Any]] | AsyncIterable[tuple[T, Any]]


class WindowedStream(Generic[T]):
    """One call; iterate it (inside `async with`) for (tag, response) in request order."""

    def __init__(self, call: BidiCall, requests: Requests[T], window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._call = call
        self._requests = requests
        self._slots = asyncio.Semaphore(window)
        self._in_flight: deque[tuple[T, str]] = deque()  # (tag, request_id), oldest first
        self._half_closed = False
        self._writer: asyncio.Task[None] | None = None
        self._first_status: tuple[grpc.StatusCode, str] | None = None

    async def __aenter__(self) -> WindowedStream[T]:
        watch = getattr(self._call, "add_done_callback", None)
        if watch is not None:
            watch(self._record_status)
        self._writer = asyncio.ensure_future(self._write())
        return self

    def _record_status(self, call: Any) -> None:
        """The status the call ended with, read the moment it ended. grpc.aio (1.85) replaces
        it with INTERNAL "Internal error from Core" when a write was still being sent as the
        server ended the stream (grpc/grpc#36066): a token refusal read as INTERNAL."""
        code, details = _now(call.code()), _now(call.details())
        if code is not None:
            self._first_status = (code, details or "")

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._call.cancel()

    def unanswered(self) -> list[T]:
        """The tags of requests sent and not answered: after a failure, the lost ones."""
        return [tag for tag, _ in self._in_flight]

    def __aiter__(self) -> WindowedStream[T]:
        return self

    async def __anext__(self) -> tuple[T, Any]:
        try:
            response = await self._read()
        except grpc.RpcError as err:
            first = self._first_status
            if first is not None and first[0] != grpc.StatusCode.OK and \
                    _code_of(err) == grpc.StatusCode.INTERNAL:
                raise ClientError(*first) from None
            raise ClientError.from_rpc(err) from None
        if response is grpc.aio.EOF:
            if self._in_flight or not self._half_closed:
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "stream ended early")
            raise StopAsyncIteration
        due = self._in_flight[0][1] if self._in_flight else None
        if response.request_id != due:
            raise ClientError(grpc.StatusCode.INTERNAL, f"answer {response.request_id!r} came "
                              f"where {due!r} was due: the stream is out of order")
        tag, _ = self._in_flight.popleft()
        self._slots.release()
        return tag, response

    async def _write(self) -> None:
        source = aiter(self._requests) if isinstance(self._requests, AsyncIterable) \
            else _async(self._requests)
        try:
            await self._send(source)
        finally:  # now, not at garbage collection: a source may hold a thread
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    async def _send(self, source: AsyncIterator[tuple[T, Any]]) -> None:
        while True:
            await self._slots.acquire()  # a slot first: what is taken is sent at once
            entry = await anext(source, _END)
            if entry is _END:
                break
            tag, request = entry
            self._in_flight.append((tag, request.request_id))
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the call is over: reading it says how
        self._half_closed = True
        try:
            await self._call.done_writing()
        except Exception:
            return

    async def _read(self) -> Any:
        """The next response, or the writer's own failure (a source or request that raised)."""
        writer = self._writer
        if writer is None:
            raise RuntimeError("iterate a WindowedStream inside `async with`")
        if writer.done():
            writer.result()
            return await self._call.read()
        read = asyncio.ensure_future(self._call.read())
        read.add_done_callback(_retrieved)
        try:
            await asyncio.wait({read, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done() and writer.exception() is not None:
                writer.result()
            return await read
        finally:
            if not read.done():
                read.cancel()


async def _async(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def _now(coroutine: Any) -> Any:
    """The value of a grpc.aio status coroutine that has it already, without awaiting (this
    runs in a done callback); None if it would have to wait."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    except Exception:
        return None
    coroutine.close()
    return None


def _code_of(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A read dropped for the writer's failure: its own error is not news."""
    if not task.cancelled():
        task.exception()


class BlockingStreams:
    """WindowedStream for BertClient: a grpc.aio channel of its own on the process's stream
    loop; `stream` is a blocking iterator of (tag, response)."""

    def __init__(self, open_channel: Callable[[], grpc.aio.Channel]) -> None:
        self._loop = _stream_loop()
        self._channel = self._run(_made(open_channel))  # grpc.aio binds it to this loop

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stream(self, start: Callable[[grpc.aio.Channel], BidiCall],
               requests: Iterable[tuple[T, Any]], window: int) -> Iterator[tuple[T, Any]]:
        async def enter() -> WindowedStream[T]:
            opened = WindowedStream(start(self._channel), _pulled_in_thread(requests), window)
            return await opened.__aenter__()

        stream = self._run(enter())
        try:
            while (answer := self._run(_next(stream))) is not _END:
                yield answer
        finally:
            self._run(stream.__aexit__(None, None, None))

    def close(self) -> None:
        self._run(self._channel.close())


async def _made(make: Callable[[], R]) -> R:
    return make()


async def _next(stream: WindowedStream[T]) -> tuple[T, Any]:
    return await anext(stream, _END)


async def _pulled_in_thread(items: Iterable[T]) -> AsyncIterator[T]:
    """The caller's items, each read on this stream's own daemon thread when asked for: an
    iterator that blocks (stdin, a queue) stalls only its own stream, and a caller that stops
    early while it blocks does not hold the process at exit."""
    loop = asyncio.get_running_loop()
    iterator = iter(items)
    asks: queue.SimpleQueue[asyncio.Future[Any] | None] = queue.SimpleQueue()

    def pull() -> None:
        while (wanted := asks.get()) is not None:
            try:
                item = next(iterator, _END)
            except BaseException as exc:  # the caller's own error, raised where it reads
                loop.call_soon_threadsafe(_deliver, wanted, None, exc)
                return
            loop.call_soon_threadsafe(_deliver, wanted, item, None)
            if item is _END:
                return

    threading.Thread(target=pull, name="bertstream-items", daemon=True).start()
    try:
        while True:
            wanted: asyncio.Future[Any] = loop.create_future()
            asks.put(wanted)
            item = await wanted
            if item is _END:
                return
            yield item
    finally:
        asks.put(None)


def _deliver(future: asyncio.Future[Any], item: Any, exc: BaseException | None) -> None:
    if future.done():  # the stream stopped waiting
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(item)


_loops: dict[int, asyncio.AbstractEventLoop] = {}  # by process id: a fork starts its own
_loops_lock = threading.Lock()


def _stream_loop() -> asyncio.AbstractEventLoop:
    """The event loop every BertClient's streams run on, on a daemon thread started once."""
    with _loops_lock:
        loop = _loops.get(os.getpid())
        if loop is None:
            loop = _loops[os.getpid()] = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="bertstream-streams",
                             daemon=True).start()
        return loop
