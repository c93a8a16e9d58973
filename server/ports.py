"""TCP ports for the gRPC and HTTP listeners, shared by front-end processes (SO_REUSEPORT:
the kernel spreads connections over every process listening on the port, as gRPC's
multiprocessing example does) and never silently shared with another server."""

from __future__ import annotations

import socket

__all__ = ["bind", "check_free"]


def _socket(host: str) -> socket.socket:
    # proto TCP, not 0: accepted connections copy it, and asyncio turns Nagle off
    # (TCP_NODELAY) only on sockets whose proto says TCP; without it every HTTP response
    # (headers, then body: two writes) waited ~40 ms for the client's delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def bind(host: str, port: int, shared: bool, what: str = "") -> socket.socket:
    """A socket bound to host:port, not listening yet (port 0: a free one); `shared` sets
    SO_REUSEPORT so this server's other processes can bind it too. A bound socket that never
    listens holds the port without taking connections."""
    sock = _socket(host)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot bind {what}{host}:{port}: {exc}") from None
    return sock


def check_free(host: str, port: int, what: str = "") -> None:
    """Exit when another server listens on host:port. With SO_REUSEPORT alone, a second
    server started on the same port would bind it too and take a share of the connections;
    a bind without SO_REUSEPORT fails against any socket listening there, shared or not."""
    bind(host, port, shared=False, what=what).close()
