"""The ordered bidirectional stream, written once for EmbedStream and ClassifyStream.

Contract: a reader task takes request messages and starts each one at once (so texts from
one stream share batches), but at most `window` messages are in flight: when the window is
full the reader stops reading, which is how gRPC flow control slows the sender instead of the
server buffering without bound. The writer yields exactly one response per request, in
request order; a failed message becomes a response carrying its error and the stream goes on.
When the caller goes away, its queued work is cancelled.

Two ways a stream ends with a status instead: a message whose bytes do not parse
(INVALID_ARGUMENT: the stream cannot be trusted past it), and the server draining on SIGTERM
(`draining` set): the reader stops reading, every message already read is answered, then the
stream ends UNAVAILABLE so the caller sends the rest to another replica. Nothing read is lost,
nothing unread is half-done.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from ..errors import to_status
from ..tracing import TRACE
from .traced import traced_messages

__all__ = ["ordered_stream"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


async def ordered_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    on_error: Callable[[Req, int, str], Resp],
    window: int,
    context: grpc.aio.ServicerContext,
    draining: asyncio.Event | None = None,
) -> AsyncIterator[Resp]:
    if TRACE.on:  # a span per message (api/traced.py)
        handle = traced_messages(handle)
    pending: asyncio.Queue[tuple[Req, asyncio.Task[Resp]] | _Drained | None] = \
        asyncio.Queue(window)
    stop = asyncio.ensure_future((draining or asyncio.Event()).wait())

    async def read() -> None:
        iterator = aiter(requests)
        while True:
            received = asyncio.ensure_future(anext(iterator))
            received.add_done_callback(_retrieved)
            try:
                await asyncio.wait({received, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # cancelled (the caller left), or draining: drop the pending read
                drop = not received.done()
                if drop:
                    received.cancel()
            if drop:  # draining: what was not read is not ours to answer
                await pending.put(_DRAINED)
                return
            try:
                request = received.result()
            except StopAsyncIteration:
                break
            await pending.put((request, asyncio.create_task(handle(request))))
        await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (entry := await _next(pending, reader)) is not None:
            if isinstance(entry, _Drained):
                await context.abort(grpc.StatusCode.UNAVAILABLE, _DRAINING_MESSAGE)
            request, task = entry
            try:
                response = await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = to_status(exc)
                response = on_error(request, code.value[0], message)
            yield response
    except DecodeError as exc:  # from the reader: bytes that are not a request message
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"a stream message does not parse as {_message_name(exc)}; the "
                            "stream ends here")
    finally:
        stop.cancel()
        reader.cancel()
        while not pending.empty():
            entry = pending.get_nowait()
            if isinstance(entry, tuple):
                entry[1].cancel()


class _Drained:
    """Queued by the reader when the server drains: answer what came before, then end."""


_DRAINED = _Drained()
_DRAINING_MESSAGE = ("server is shutting down: every message it read was answered; send the "
                     "rest again (to another replica)")


def _retrieved(future: asyncio.Future[object]) -> None:
    """Mark a dropped read's outcome as seen, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


def _message_name(exc: DecodeError) -> str:
    """The message type protobuf names in its error ("... with type 'x.y.Z'")."""
    found = re.search(r"type '([\w.]+)'", str(exc))
    return found.group(1) if found else "the request message"


async def _next(pending: asyncio.Queue[T], reader: asyncio.Task[None]) -> T:
    """The next queued entry; once none is queued and the reader has died (a broken stream),
    its error. Entries queued before the error are answered first."""
    while pending.empty() and not reader.done():
        getter = asyncio.ensure_future(pending.get())
        try:
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            got = getter.done()
            if not got:  # cancel() only asks: the getter is not cancelled before it runs
                getter.cancel()
        if got:
            return getter.result()
    if pending.empty():
        reader.result()  # raises the reader's error, if any
    return await pending.get()
