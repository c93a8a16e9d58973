"""Frames between front-end processes and the engine (server/frontend.py, server/engine.py).

A message is a tuple pickled with protocol 5; its numpy arrays (token ids in, vectors out)
travel as out-of-band buffers: written from the array's own memory and read back as arrays
over the received bytes, so an array is copied once by the kernel each way and never by
pickle. Layout: `<II` (metadata bytes, buffer count), one `<Q` length per buffer, the
metadata, then the buffers.

The socket is a unix socket in the server's private run folder (mode 0700), spoken only by
processes of the same server: pickle is safe here because nothing outside the server can
connect. Why not gRPC on this hop: its per-message cost on the event loop (~100 us) is what
the front ends exist to take off the engine.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

__all__ = ["FrameTooLarge", "Outbox", "encode_frame", "read_frame", "write_frame"]

_HEAD = struct.Struct("<II")
_LEN = struct.Struct("<Q")
MAX_FRAME = 1 << 31  # a frame over 2 GiB is a bug, not a request


class FrameTooLarge(ValueError):
    pass


def encode_frame(message: tuple[Any, ...]) -> list[bytes | memoryview]:
    """The pieces of one frame, ready for `writelines` (buffers are not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(meta), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws)
    return [head, meta, *raws]


def write_frame(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    writer.writelines(encode_frame(message))


class Outbox:
    """Frames sent in one turn of the event loop leave in one write: a batch answering 32
    unary calls costs one system call, not 32."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._pieces: list[bytes | memoryview] = []
        self._loop = asyncio.get_running_loop()

    def send(self, message: tuple[Any, ...]) -> None:
        if not self._pieces:
            self._loop.call_soon(self._flush)
        self._pieces.extend(encode_frame(message))

    def _flush(self) -> None:
        pieces, self._pieces = self._pieces, []
        if not self.writer.is_closing():
            self.writer.writelines(pieces)

    def buffered(self) -> int:
        """Bytes waiting in the transport (for backpressure)."""
        return self.writer.transport.get_write_buffer_size()


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message; raises asyncio.IncompleteReadError when the peer is gone. Two reads
    per frame: the head with the buffer lengths, then the rest, sliced without copying."""
    meta_len, count = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    lengths = struct.unpack(f"<{count}Q", await reader.readexactly(_LEN.size * count)) \
        if count else ()
    total = meta_len + sum(lengths)
    if total > MAX_FRAME:
        raise FrameTooLarge(f"frame of {total} bytes")
    body = memoryview(await reader.readexactly(total))
    buffers, at = [], meta_len
    for n in lengths:
        buffers.append(body[at:at + n])
        at += n
    message = pickle.loads(body[:meta_len], buffers=buffers)
    assert isinstance(message, tuple)
    return message
