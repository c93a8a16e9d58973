"""One channel to one server or to several replicas, balanced by gRPC itself.

Several addresses become one channel whose target lists them all (`ipv4:a,b,c`), or a DNS
name whose records are the replicas (`dns:///bertstream.ns.svc:8001`, a Kubernetes headless
Service); the channel's service config asks for `round_robin` with the standard health check,
so a replica that is down, starting or draining (its grpc.health.v1 status is NOT_SERVING) gets
no new calls and comes back when it serves again. Unary calls are retried by gRPC's own retry
policy on UNAVAILABLE. Nothing here picks a backend by hand.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "TlsFiles",
    "call_metadata",
    "channel_options",
    "channel_target",
    "open_aio_channel",
    "open_channel",
    "split_servers",
    "tls_credentials",
]

MiB = 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_receive_message_length", 256 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]
# A replica that restarts is tried again within a second or two, not gRPC's default of up
# to two minutes later.
RECONNECT_OPTIONS: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # "": the server's overall status (server/api/health.py), NOT_SERVING while it drains.
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [{
        "name": [{"service": "bertstream.v1.BertService"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


def split_servers(servers: str | Sequence[str]) -> list[str]:
    """"a:1,b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"]."""
    items = [servers] if isinstance(servers, str) else list(servers)
    out = [s.strip() for item in items for s in item.split(",") if s.strip()]
    if not out:
        raise ValueError("no server address given")
    return out


def _host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"server address {address!r} is not HOST:PORT")
    return host.strip("[]"), port


def _resolve(address: str) -> list[str]:
    """HOST:PORT -> its IP addresses as `ip:port` / `[ip]:port`, each IP once."""
    host, port = _host_port(address)
    try:
        ip = ipaddress.ip_address(host)
        ips = [str(ip)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"cannot resolve {host!r}: {exc}") from None
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def channel_target(servers: str | Sequence[str]) -> str:
    """The gRPC target for one or several servers.

    One address stays as given (a DNS name is then re-resolved by gRPC, so a headless Service
    that gains replicas is followed). Several are resolved once, here, into one static list:
    gRPC has no target syntax for several host names.
    """
    addresses = split_servers(servers)
    if len(addresses) == 1:
        address = addresses[0]
        if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
            return address
        _host_port(address)
        return f"dns:///{address}"
    resolved = list(dict.fromkeys(a for address in addresses for a in _resolve(address)))
    if all(not a.startswith("[") for a in resolved):
        return "ipv4:" + ",".join(resolved)
    v6 = [a if a.startswith("[") else f"[::ffff:{a.rsplit(':', 1)[0]}]:{a.rsplit(':', 1)[1]}"
          for a in resolved]
    return "ipv6:" + ",".join(v6)


def channel_options() -> list[tuple[str, object]]:
    return [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS,
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1)]


@dataclass(frozen=True)
class TlsFiles:
    """What a client needs for TLS: a CA to trust (None: the system roots) and, for mutual
    TLS, its own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return tls_credentials(self.ca, self.cert, self.key)


def tls_credentials(ca: Path | None = None, cert: Path | None = None,
                    key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS trusting `ca` (the system roots when None); `cert` and `key` present a client
    certificate, for servers started with --tls-client-ca (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The per-call metadata that carries a bearer token (server/api/security.py)."""
    return (("authorization", f"Bearer {token}"),) if token else None


def _options(credentials: grpc.ChannelCredentials | None,
             server_name: str | None) -> list[tuple[str, object]]:
    if server_name and credentials is None:
        raise ValueError("server_name only applies to TLS channels")
    # Several addresses have no one name for the certificate check: say which to expect.
    return [*channel_options(), *([("grpc.ssl_target_name_override", server_name)]
                                  if server_name else [])]


def open_channel(servers: str | Sequence[str],
                 credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None) -> grpc.Channel:
    target, options = channel_target(servers), _options(credentials, server_name)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options)
    return grpc.insecure_channel(target, options)


def open_aio_channel(servers: str | Sequence[str],
                     credentials: grpc.ChannelCredentials | None = None,
                     server_name: str | None = None) -> grpc.aio.Channel:
    target, options = channel_target(servers), _options(credentials, server_name)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options)
    return grpc.aio.insecure_channel(target, options)
