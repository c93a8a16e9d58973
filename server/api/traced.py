"""Request spans at the protocol edges (tracing.py has the tree and the sampling rules).

- gRPC: `TracingInterceptor` (installed only with `--trace-endpoint`) opens a span per unary
  call; for a stream it only reads the caller's traceparent, and `traced_messages` (hooked
  into streams.py's ordered stream) opens a span per message, each a child of the caller's
  context: a long stream is many short traces, not one that lasts hours.
- HTTP: `traced_http` wraps a dialect's endpoint (common.Dialect.handler) when tracing is on.
Health, reflection and readiness probes are not traced.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc

from ..errors import BertstreamError
from ..tracing import TRACE, TRACE_HEADERS
from .handlers import behaviour_of, is_probe, with_behaviour

__all__ = ["TracingInterceptor", "traced_http", "traced_messages"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# The codes OpenTelemetry's RPC conventions count as the server's fault (span status ERROR);
# the others are the caller's, recorded in rpc.grpc.status_code only.
_SERVER_FAULTS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
# Set by the interceptor for a stream's handler: its method and the caller's context.
_STREAM: ContextVar[tuple[str, Any] | None] = ContextVar("bertstream_trace_stream",
                                                         default=None)


def _carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if key in TRACE_HEADERS}


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _set_code(span: Any, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        TRACE.fail(span, code.name)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A span per unary call; a stream's caller context for `traced_messages`."""

    def __init__(self) -> None:
        self._made: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or is_probe(method):
            return handler
        made = self._made.get(handler)  # bounded by the number of methods
        if made is None:
            made = self._made[handler] = _traced(handler, method.lstrip("/"))
        return made


def _traced(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    behaviour = behaviour_of(handler)
    attributes = _rpc_attributes(method)
    if handler.request_streaming:  # spans per message (traced_messages), not per stream
        if inspect.isasyncgenfunction(behaviour):

            async def stream(requests: Any, context: grpc.aio.ServicerContext,
                             ) -> AsyncIterator[Any]:
                _STREAM.set((method, TRACE.parent(_carrier(context.invocation_metadata()))))
                async for response in behaviour(requests, context):
                    yield response

            return with_behaviour(handler, stream)

        async def coroutine(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            _STREAM.set((method, TRACE.parent(_carrier(context.invocation_metadata()))))
            return await behaviour(requests, context)

        return with_behaviour(handler, coroutine)
    if handler.response_streaming:  # no such rpc outside probes; traced as one span
        return handler

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        parent = TRACE.parent(_carrier(context.invocation_metadata()))
        with TRACE.request(method, parent, attributes) as span:
            code = grpc.StatusCode.OK
            try:
                return await behaviour(request, context)
            except asyncio.CancelledError:  # the caller left
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:  # an abort (its code is the context's) or a fault
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if span.is_recording():
                    _set_code(span, code)

    return with_behaviour(handler, unary)


def traced_messages(handle: Callable[[Req], Awaitable[Resp]]
                    ) -> Callable[[Req], Awaitable[Resp]]:
    """A stream's per-message handler, each message in a span of its own under the caller's
    context (from the interceptor); `handle` itself where no traced stream is running."""
    stream = _STREAM.get()
    if stream is None:
        return handle
    method, parent = stream
    attributes = _rpc_attributes(method)
    count = 0

    async def traced(request: Req) -> Resp:
        nonlocal count
        count += 1
        message = {**attributes, "bertstream.stream.message": count}
        request_id = getattr(request, "request_id", "") or getattr(request, "id", "")
        if isinstance(request_id, str) and request_id:
            message["bertstream.request_id"] = request_id
        with TRACE.request(method, parent, message) as span:
            try:
                response = await handle(request)
            except Exception as exc:  # answered as this message's error; the stream goes on
                if span.is_recording():
                    _set_code(span, exc.code if isinstance(exc, BertstreamError)
                              else grpc.StatusCode.INTERNAL)
                raise
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", 0)
            return response

    return traced


def traced_http(label: str, endpoint: Callable[[Any], Awaitable[Any]]
                ) -> Callable[[Any], Awaitable[Any]]:
    """An HTTP endpoint (Starlette request -> response) in a span per request, under the
    caller's `traceparent` header when it sent one."""

    async def traced(request: Any) -> Any:
        parent = TRACE.parent(_carrier(request.headers.items()))
        with TRACE.request(f"{request.method} {label}", parent, {
            "http.request.method": request.method, "url.path": request.url.path,
            "bertstream.route": label,
        }) as span:
            response = await endpoint(request)
            if span.is_recording():
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    TRACE.fail(span)
            return response

    traced.__doc__ = endpoint.__doc__
    traced.__name__ = endpoint.__name__
    return traced
