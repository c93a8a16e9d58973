"""What every HTTP dialect shares: reading a body under its limit, JSON, tokens, errors and
their HTTP status, request metrics and the drain. A dialect module supplies its routes and the
shape its errors take (`Dialect.error_body`); the rules live here once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ...errors import BertstreamError
from ...metrics import Metrics
from ...pipeline.inference import Pipeline, Result, Schedule, Who
from ...repository.models import Models
from ...tracing import TRACE
from ..security import INFERENCE, TokenTable, client_of
from ..traced import traced_http
from .connections import RETRY_AFTER_S

__all__ = ["HTTP_STATUS", "Dialect", "HttpContext", "HttpError", "caller", "json_response",
           "read_json"]

log = logging.getLogger("bertstream.rest")

# The error taxonomy's gRPC codes as HTTP statuses (KServe's and Triton's mapping).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,  # the caller left (nginx's code); nobody reads it
}


class HttpError(BertstreamError):
    """A refusal that is only HTTP's (a body too large, JSON that does not parse)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CallerGone(BertstreamError):
    """An HTTP caller that closed its connection before its request was read."""

    code = grpc.StatusCode.CANCELLED


@dataclass
class HttpContext:
    """The server's pieces an HTTP handler may use."""

    pipeline: Pipeline
    metrics: Metrics
    control_mode: str
    draining: asyncio.Event
    max_body_bytes: int
    auth: TokenTable | None = None
    body_timeout_s: float = 30.0  # the longest gap between two pieces of a body
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def models(self) -> Models:
        return self.pipeline.models


def pooled(result: Result, route: str, status: int) -> np.ndarray:
    """A result's pooled vectors [texts, width]; a model whose default output is token
    vectors (one array per text) cannot answer a route that returns one vector per text."""
    if not isinstance(result.vectors, np.ndarray):
        raise HttpError(status, f"model {result.model!r} answers token vectors by default; "
                        f"{route} needs a pooled model")
    return result.vectors


def caller(request: Request) -> Who:
    """Whose turn a request's texts take (scheduler.py): its connection, so a keep-alive
    client's requests queue behind each other and beside other clients'; charged to its
    token, else its host."""
    client = request.client
    turn = f"http:{client.host}:{client.port}" if client else f"http:{id(request)}"
    return Who(turn, client_of(request.headers.get("authorization"),
                               client.host if client else turn))


def schedule(request: Request) -> Schedule:
    """An HTTP request's place in the queues: the server's default level, its caller."""
    who = caller(request)
    return Schedule(caller=who.turn, client=who.client)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    """orjson: numpy arrays serialize natively, several times faster than json."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status,
                    headers=headers, media_type="application/json")


async def read_body(request: Request, context: HttpContext) -> bytes:
    """The body, refused 413 before it is read whole when it is over the size limit: by its
    Content-Length at once, else (chunked) as soon as the running total passes it; and 408
    when it stops arriving (no piece for `body_timeout_s`), so a stalled upload does not hold
    its connection."""
    limit, wait_s = context.max_body_bytes, context.body_timeout_s
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body of {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    pieces = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(pieces.__anext__(), wait_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise HttpError(408, f"the request body stopped arriving: nothing for "
                                f"{wait_s:g} s after {size} bytes") from None
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the caller left mid-upload: nobody to answer, nothing to log
        raise CallerGone("the client disconnected before its body arrived") from None
    return b"".join(chunks)


async def read_json(request: Request, context: HttpContext) -> Any:
    body = await read_body(request, context)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class Dialect:
    """One HTTP API: its name in metrics and logs, and how its errors look."""

    name: str
    error_body: Callable[[int, str], Any]  # (HTTP status, message) -> JSON body

    def handler(self, context: HttpContext, rpc: str, scope: str = INFERENCE,
                ) -> Callable[[Callable[[Request], Awaitable[Response]]],
                              Callable[[Request], Awaitable[Response]]]:
        """Wrap an endpoint: tokens, the drain, metrics, and every failure as this dialect's
        error with its HTTP status; nothing a caller sent reaches the log."""
        label = f"{self.name}:{rpc}"

        def wrap(endpoint: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
            async def run(request: Request) -> Response:
                context.in_flight += 1
                context.idle.clear()
                try:
                    if context.auth is not None:
                        context.auth.authorize(scope, request.headers.get("authorization"),
                                               rpc, "header")
                    if context.draining.is_set():
                        response = self.error(503, "server is shutting down; send it elsewhere")
                        response.headers["connection"] = "close"  # do not send the next here
                        return response
                    with context.metrics.request(label, request.path_params.get("model", "")
                                                 ) as record:
                        request.state.record = record  # the endpoint says model and texts
                        return await endpoint(request)
                except HttpError as exc:
                    return self.error(exc.status, str(exc))
                except BertstreamError as exc:
                    return self.error(HTTP_STATUS.get(exc.code, 500), str(exc))
                except Exception:  # a server fault: metrics.request logged it, never input
                    return self.error(500, "internal server error")
                finally:
                    context.in_flight -= 1
                    if context.in_flight == 0:
                        context.idle.set()

            run.__doc__ = endpoint.__doc__
            run.__name__ = endpoint.__name__
            return traced_http(label, run) if TRACE.on else run  # a span per request

        return wrap

    def error(self, status: int, message: str) -> Response:
        """The dialect's error body; 429 and 503 say when to come back (Retry-After), and a
        408 closes the connection (its request's bytes may still be on the way)."""
        response = json_response(self.error_body(status, message), status)
        if status in (429, 503):
            response.headers["retry-after"] = str(RETRY_AFTER_S)
        elif status == 408:
            response.headers["connection"] = "close"
        return response
