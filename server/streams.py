"""The ordered bidirectional stream, written once for EmbedStream and ClassifyStream.

Contract: a reader task takes request messages and starts each one at once (so texts from
one stream share batches), but at most `window` messages are in flight: when the window is
full the reader stops reading, which is how gRPC flow control slows the sender instead of the
server buffering without bound. The writer yields exactly one response per request, in
request order; a failed message becomes a response carrying its error and the stream goes on.
When the caller goes away, its queued work is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from .errors import to_status

__all__ = ["ordered_stream"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


async def ordered_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    on_error: Callable[[Req, int, str], Resp],
    window: int,
) -> AsyncIterator[Resp]:
    pending: asyncio.Queue[tuple[Req, asyncio.Task[Resp]] | None] = asyncio.Queue(window)

    async def read() -> None:
        async for request in requests:
            await pending.put((request, asyncio.create_task(handle(request))))
        await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (entry := await _next(pending, reader)) is not None:
            request, task = entry
            try:
                response = await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = to_status(exc)
                response = on_error(request, code.value[0], message)
            yield response
    finally:
        reader.cancel()
        while not pending.empty():
            entry = pending.get_nowait()
            if entry is not None:
                entry[1].cancel()


async def _next(pending: asyncio.Queue[T], reader: asyncio.Task[None]) -> T:
    """The next queued entry; if the reader dies first (a broken stream), its error."""
    if reader.done():
        reader.result()
        return await pending.get()
    getter = asyncio.ensure_future(pending.get())
    await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    reader.result()  # raises the reader's error, if any
    return await pending.get()
