"""How long a gRPC connection may live and what it may do, as grpc core's server options.

- **Ageing** (`max_connection_age_s`): a client's round_robin balancer only sees replicas
  added behind a DNS name or a Service when it reconnects, so connections end after minutes,
  not never. grpc core jitters the age by +-10 % so a fleet's clients do not all reconnect at
  once. The server sends GOAWAY: new calls go to a new connection, and the calls in flight
  finish on the old one (`max_connection_age_grace_s` 0: however long they take; a stream is
  not cut, because not every client resumes one: the bulk feed does, BertClient's
  encode_stream and the Node example do not yet). With a grace period, a stream still open
  at its end is cut with UNAVAILABLE "max connection age", which the feed resumes at once.
- **Idle** (`max_connection_idle_s`): a connection with no call for this long is closed.
- **Keepalive enforcement**: a client pinging more often than `min_ping_interval_s` without
  calls in flight gets strikes and then GOAWAY ("too_many_pings"), not service for ever; the
  server itself pings every `keepalive_time_s` so a vanished peer's connection is dropped.
- **Streams per connection** (`max_concurrent_streams`) and a short TLS/HTTP2 handshake
  (`handshake_timeout_s`): a connection cannot open unbounded streams, nor a socket sit
  half-open in the handshake for grpc's default two minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GrpcConnectionLimits"]


@dataclass(frozen=True)
class GrpcConnectionLimits:
    """Defaults and why: docs/operators.md, "Connection limits"."""

    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 0.0  # 0: calls in flight finish whenever they do
    max_connection_idle_s: float = 300.0
    min_ping_interval_s: float = 10.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_concurrent_streams: int = 256
    handshake_timeout_s: float = 10.0

    def server_options(self) -> list[tuple[str, int]]:
        """grpc.aio.server(options=...) for these limits (0 turns ageing, its grace period
        and idle closing off)."""
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        options = [
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
        ]
        if self.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_s)))
        if self.max_connection_age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms",
                            ms(self.max_connection_age_grace_s)))
        if self.max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)))
        return options
