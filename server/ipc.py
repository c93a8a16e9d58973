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

__all__ = ["FrameTooLarge", "encode_frame", "read_frame", "write_frame"]

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


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message; raises asyncio.IncompleteReadError when the peer is gone."""
    meta_len, count = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    lengths = [_LEN.unpack(await reader.readexactly(_LEN.size))[0] for _ in range(count)]
    if meta_len + sum(lengths) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {meta_len + sum(lengths)} bytes")
    meta = await reader.readexactly(meta_len)
    buffers = [await reader.readexactly(n) for n in lengths]
    message = pickle.loads(meta, buffers=buffers)
    assert isinstance(message, tuple)
    return message
