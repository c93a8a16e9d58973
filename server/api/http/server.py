"""The HTTP server: a Starlette app of every dialect's routes, served by uvicorn inside the
server's own event loop (no thread, no second loop), on a socket bound with SO_REUSEPORT so
front-end processes share the port as they share gRPC's. TLS uses the gRPC port's files.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator

from ... import ports
from . import bert_as_service, kserve, openai, tei
from .common import HttpContext, json_response
from .connections import ConnectionLimits, guarded_protocol

__all__ = ["HttpServer"]

log = logging.getLogger("bertstream.rest")
DRAIN_QUIET_S = 1.0  # after the last request of a drain, the port still answers 503 this long


class _Schemas(SchemaGenerator):
    """The OpenAPI page from each endpoint's docstring: its first line is the summary, the
    rest its description. Plain prose, not YAML: a docstring can never break the page."""

    def parse_docstring(self, func_or_method: Any) -> dict[str, Any]:
        doc = inspect.getdoc(func_or_method) or ""
        first, _, rest = doc.strip().partition("\n")
        first = first.removeprefix("summary:").strip()
        return {"summary": first, "description": rest.strip()} if rest.strip() else \
            {"summary": first}


SCHEMAS = _Schemas({"openapi": "3.0.0", "info": {"title": "bertstream HTTP", "version": "1"}})


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the server's own SIGTERM drain decides."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_app(context: HttpContext) -> Starlette:
    routes: list[BaseRoute] = []
    for dialect in (kserve, openai, tei, bert_as_service):
        routes += dialect.routes(context)

    async def schema(request: object) -> object:
        """The OpenAPI description of every route (GET /openapi.json)."""
        return json_response(SCHEMAS.get_schema(routes))

    routes.append(Route("/openapi.json", schema, include_in_schema=False))
    return Starlette(routes=routes)


class HttpServer:
    def __init__(self, context: HttpContext, host: str, port: int,
                 tls_cert: Path | None = None, tls_key: Path | None = None,
                 tls_client_ca: Path | None = None, shared: bool = False,
                 limits: ConnectionLimits | None = None) -> None:
        self.context = context
        limits = limits or ConnectionLimits()
        self._sock = _listen(host, port, shared)
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            build_app(context), log_level="warning", access_log=False, lifespan="off",
            server_header=False, ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_client_ca) if tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
            timeout_graceful_shutdown=5, http=guarded_protocol(limits),
            timeout_keep_alive=limits.keepalive_timeout_s)
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def drain(self, grace_s: float) -> None:
        """New requests get 503 with `Connection: close` (the draining flag), running ones
        finish (at most grace_s), and for a quiet moment after that the port still answers,
        so a keep-alive client's next request reads 503, not a reset; then connections close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        if self.context.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.context.idle.wait(), grace_s)
        if self._server.server_state.connections:  # a keep-alive client may send again
            await asyncio.sleep(max(0.0, min(DRAIN_QUIET_S, deadline - loop.time())))
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def _listen(host: str, port: int, shared: bool) -> socket.socket:
    sock = ports.bind(host, port, shared, "the HTTP port ")
    sock.listen(2048)
    sock.setblocking(False)
    return sock
