"""Who may call: TLS / mutual TLS credentials for the port, and bearer tokens with two scopes.

Scopes: `inference` (Embed, Classify, Rerank, Tokenize, the model listings, KServe inference and
metadata) and `admin` (everything inference may, plus LoadModel / UnloadModel and the KServe
repository rpcs). Health, KServe's liveness / readiness rpcs and reflection stay open, so
probes and grpcurl work without a token.

Tokens come as whitespace-separated `scope:token` pairs, from a file (`--auth-token-file`, `#`
starts a comment) or the BERTSTREAM_AUTH_TOKENS environment variable; callers send
`authorization: Bearer <token>`. Tokens are compared as SHA-256 digests with
`hmac.compare_digest`, against every configured token without stopping early, and are never
logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..errors import PermissionDenied, Unauthenticated
from .handlers import is_probe, refusal

__all__ = ["ADMIN", "INFERENCE", "OPEN", "AuthInterceptor", "TokenTable", "client_of",
           "server_credentials"]

log = logging.getLogger(__name__)

INFERENCE = "inference"
ADMIN = "admin"
SCOPES = (INFERENCE, ADMIN)
OPEN = "open"

_ADMIN_METHODS = frozenset({
    "/bertstream.v1.BertService/LoadModel",
    "/bertstream.v1.BertService/UnloadModel",
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
})


def required_scope(method: str) -> str:
    """The scope a full method name ("/pkg.Service/Method") needs; OPEN for health."""
    if is_probe(method):
        return OPEN
    return ADMIN if method in _ADMIN_METHODS else INFERENCE


def client_of(authorization: str | None, host: str) -> str:
    """Who a request's texts in flight are charged to (Limits.max_client_texts): its bearer
    token (by digest: never the token itself), else the host it came from."""
    kind, _, token = (authorization or "").partition(" ")
    if kind.lower() == "bearer" and token.strip():
        return "token:" + _digest(token.strip()).hex()[:16]
    return "host:" + host


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


@dataclass(frozen=True)
class TokenTable:
    """Digests of the configured tokens with their scopes."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def parse(cls, text: str, where: str) -> TokenTable:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            for word in line.split("#", 1)[0].split():
                scope, sep, token = word.partition(":")
                if not sep or scope not in SCOPES or not token:
                    raise ValueError(f"{where}:{number}: expected scope:token with scope "
                                     f"{' or '.join(SCOPES)}")  # the token itself is not shown
                if len(token) < 16:
                    log.warning("%s:%d: a %s token of %d characters is easy to guess",
                                where, number, scope, len(token))
                entries.append((_digest(token), scope))
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path | None, environment: str | None) -> TokenTable | None:
        """Tokens from the file and the environment variable; None when neither has any
        (then the server asks for no token)."""
        entries: tuple[tuple[bytes, str], ...] = ()
        if path is not None:
            entries += cls.parse(path.read_text(encoding="utf-8"), str(path)).entries
        if environment:
            entries += cls.parse(environment, "BERTSTREAM_AUTH_TOKENS").entries
        if path is not None and not entries:
            raise ValueError(f"{path}: no tokens")
        return cls(entries) if entries else None

    def scope_of(self, token: str) -> str | None:
        """The scope of `token` (admin wins if listed twice), None if unknown."""
        presented = _digest(token)
        found: str | None = None
        for digest, scope in self.entries:  # no early exit: the time does not tell which
            if hmac.compare_digest(digest, presented) and found != ADMIN:
                found = scope
        return found

    def check(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call may go on."""
        needed = required_scope(method)
        values = [v for k, v in metadata if k == "authorization"]
        value = values[0] if values else None
        self.authorize(needed, value if isinstance(value, str | None) else
                       value.decode("latin-1"), method.rsplit("/", 1)[-1], "metadata")

    def authorize(self, needed: str, authorization: str | None, what: str,
                  carrier: str = "metadata") -> None:
        """The one check behind gRPC and HTTP: `authorization` is the header's value (None
        when absent); `what` names the call in a PermissionDenied message."""
        if needed == OPEN:
            return
        if authorization is None:
            raise Unauthenticated(f"missing authorization {carrier}: send 'Bearer <token>'")
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"authorization {carrier} must be 'Bearer <token>'")
        scope = self.scope_of(token.strip())
        if scope is None:
            raise Unauthenticated("unknown bearer token")
        if needed == ADMIN and scope != ADMIN:
            raise PermissionDenied(f"{what} needs a token with the admin scope")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call before its handler runs."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        metadata = tuple(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        try:
            self.tokens.check(method, metadata)
        except (Unauthenticated, PermissionDenied) as exc:
            # DEBUG: an unauthenticated caller must not be able to flood the log. The reason
            # is logged, never the token.
            log.debug("refused %s: %s", method, exc)
            return refusal(handler, exc.code, str(exc))
        return handler


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS for the port; with `client_ca`, mutual TLS: a client must present a certificate
    signed by that CA or its handshake fails."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
