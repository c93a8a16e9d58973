"""Frames between front-end processes and the engine (frontend_process.py, engine_process.py).

A message is a tuple (a record of messages.py) pickled with protocol 5; its numpy arrays
(token ids in, vectors out) travel as out-of-band buffers: written from the array's own memory
and read back as arrays
over the received bytes, so an array is copied by pickle neither way. Layout: `<II`
(metadata bytes, buffer count), one `<Q` length per buffer, the metadata, then the buffers.

Both ends speak through `FrameLink`, an asyncio protocol: frames are parsed in
`data_received`, all complete ones at once, and handed to a callback, with no coroutine per
frame (three awaited reads per frame cost the front ends a visible share of their loop).

The socket is a unix socket in the server's private run folder (mode 0700), spoken only by
processes of the same server: pickle is safe here because nothing outside the server can
connect. Why not gRPC on this hop: its per-message cost on the event loop (~100 us) is what
the front ends exist to take off the engine.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["FrameLink", "FrameTooLarge", "encode_frame"]

_HEAD = struct.Struct("<II")
_LEN = struct.Struct("<Q")
MAX_FRAME = 1 << 31  # a frame over 2 GiB is a bug, not a request

Message = tuple[Any, ...]


class FrameTooLarge(ValueError):
    pass


def encode_frame(message: Message) -> list[bytes | memoryview]:
    """The pieces of one frame, ready for `writelines` (buffers are not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(meta), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws)
    return [head, meta, *raws]


class FrameLink(asyncio.Protocol):
    """One end of the link. Messages arrive through `on_message`; the end of the connection
    through `on_lost` once, with the error that ended it (a malformed frame, a socket error)
    or None. Frames sent in one turn of the event loop leave in one write: a batch answering
    32 unary calls costs one system call, not 32."""

    def __init__(self, on_message: Callable[[Message], None],
                 on_lost: Callable[[BaseException | None], None],
                 high_water: int | None = None) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._high_water = high_water
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._pieces: list[bytes | memoryview] = []
        self._paused: asyncio.Future[None] | None = None  # while the transport is full
        self._error: BaseException | None = None

    # -- sending --------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message for this loop turn's write; dropped once the link is closing."""
        if self._transport is None or self._transport.is_closing():
            return
        if not self._pieces:
            self._loop.call_soon(self._flush)
        self._pieces.extend(encode_frame(message))

    def _flush(self) -> None:
        pieces, self._pieces = self._pieces, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(pieces)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark (backpressure);
        returns at once otherwise, or when the connection is lost."""
        if self._paused is not None:
            await asyncio.shield(self._paused)  # one waiter's cancel must not wake the rest

    def pause_writing(self) -> None:
        self._paused = self._loop.create_future()

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- receiving ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._high_water is not None:
            transport.set_write_buffer_limits(high=self._high_water)

    def data_received(self, data: bytes) -> None:
        self._received += data
        try:
            self._parse()
        except Exception as exc:  # a malformed frame, or its handler failed: end the link
            self._error = exc
            self.close()

    def _parse(self) -> None:
        """Deliver every complete frame in the buffer, then drop their bytes."""
        buf, at = self._received, 0
        try:
            while len(buf) - at >= _HEAD.size:
                meta_len, count = _HEAD.unpack_from(buf, at)
                if meta_len + _LEN.size * count > MAX_FRAME:
                    raise FrameTooLarge(f"frame of {count} buffers, {meta_len} bytes of metadata")
                start = at + _HEAD.size + _LEN.size * count
                if len(buf) < start:
                    return
                lengths = struct.unpack_from(f"<{count}Q", buf, at + _HEAD.size)
                size = meta_len + sum(lengths)
                if size > MAX_FRAME:
                    raise FrameTooLarge(f"frame of {size} bytes")
                if len(buf) < start + size:
                    return
                # One copy out of the buffer; the arrays are views of it, never of `buf`,
                # which is resized below.
                body = bytes(memoryview(buf)[start:start + size])
                at = start + size
                self._on_message(_decode(body, meta_len, lengths))
        finally:
            del buf[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pieces = []
        self.resume_writing()  # senders waiting on a full buffer go on; their requests fail
        self._on_lost(self._error or exc)


def _decode(body: bytes, meta_len: int, lengths: tuple[int, ...]) -> Message:
    view = memoryview(body)
    buffers, at = [], meta_len
    for n in lengths:
        buffers.append(view[at:at + n])
        at += n
    message = pickle.loads(view[:meta_len], buffers=buffers)
    if not isinstance(message, tuple):  # messages.py's records are NamedTuples
        raise ValueError(f"a frame holds a tuple, not {type(message).__name__}")
    return message
