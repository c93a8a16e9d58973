"""No connection holds the HTTP port hostage: limits uvicorn does not have, on its own protocol.

uvicorn times out only a keep-alive connection's idle gap between requests; a client that opens
a connection and sends half a request head (slowloris), or nothing at all, holds its socket for
ever, and nothing bounds how many it may hold but the process's open-file limit. So:
- **head timeout**: from a connection's first moment, and from the first byte of each later
  request, the request head must be whole within `head_timeout_s`, else 408 and close (nginx's
  client_header_timeout, hyper's header_read_timeout);
- **connection cap**: beyond `max_connections` open ones, a new connection is answered 503 with
  Retry-After at once and closed; the open ones keep working;
- the keep-alive idle gap stays uvicorn's (`timeout_keep_alive`, set from the same limits);
- a body that stops arriving is common.read_body's to time out (it can answer 408 in the
  dialect's own shape).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "guarded_protocol"]

log = logging.getLogger("bertstream.rest")
RETRY_AFTER_S = 1  # what a refused caller is told to wait (429, 503)


@dataclass(frozen=True)
class ConnectionLimits:
    """The HTTP port's limits per front-end process (operators.md says why each default)."""

    max_connections: int = 1024
    head_timeout_s: float = 30.0
    body_timeout_s: float = 30.0  # between two pieces of a body (common.read_body)
    keepalive_timeout_s: float = 15.0  # idle between requests on a keep-alive connection


def _raw_response(status: str, message: bytes, retry_after: bool) -> bytes:
    """A whole response written straight to the socket: no request was parsed to answer."""
    headers = [f"HTTP/1.1 {status}", "content-type: application/json", "connection: close",
               f"content-length: {len(message)}"]
    if retry_after:
        headers.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + message


_BUSY = _raw_response("503 Service Unavailable",
                      b'{"error": "too many open connections; retry"}', True)
_SLOW_HEAD = _raw_response("408 Request Timeout",
                           b'{"error": "the request head did not arrive in time"}', False)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a head timeout and a connection cap (module docstring)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("HTTP: %d connections open, over the cap of %d: refusing one",
                        len(self.connections) - 1, self.limits.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._head_timer is None and (cycle is None or cycle.response_complete):
            self._arm_head_timer()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self.cycle is not cycle:  # a request head arrived whole
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_late)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_SLOW_HEAD)
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """The protocol class uvicorn builds per connection, bound to these limits."""
    return type("GuardedH11", (_GuardedH11,), {"limits": limits})
