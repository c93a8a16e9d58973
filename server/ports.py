"""A TCP port several processes share (SO_REUSEPORT): the kernel spreads connections over
every process listening on it, as gRPC's multiprocessing example does."""

from __future__ import annotations

import socket

__all__ = ["bind_shared"]


def bind_shared(host: str, port: int, what: str = "") -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, not listening yet (port 0: a free
    one). A bound socket that never listens holds the port without taking connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot bind {what}{host}:{port}: {exc}") from None
    return sock
