"""gRPC method handlers made by interceptors: which calls are probes, a handler of the same
shape with another behaviour, and a refusal of any shape. Shared by the token check
(security.py) and the shutdown gate (shutdown.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

__all__ = ["HandlerCache", "behaviour_of", "is_probe", "refusal", "with_behaviour"]

# (request streaming, response streaming) -> the grpc function that builds such a handler.
_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

_PROBE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_PROBE_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})


def is_probe(method: str) -> bool:
    """Health, reflection and KServe liveness / readiness: calls that do no model work.

    One list for two policies on purpose: probes need no token (security.py) and keep
    answering while the server drains (shutdown.py). A call added here gets both."""
    return method in _PROBE_METHODS or method.startswith(_PROBE_PREFIXES)


class HandlerCache:
    """One wrapped handler per method handler, made on first use: grpc asks interceptors for
    a handler on every call, and building closures and a handler each time cost the event
    loop microseconds per call. Bounded by the number of methods."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._made: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    def __call__(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        made = self._made.get(handler)
        if made is None:
            made = self._made[handler] = self._wrap(handler)
        return made


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The one behaviour a handler carries, whatever its shape."""
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any],
                   parse_requests: bool = True) -> grpc.RpcMethodHandler:
    """A handler of the same shape and serializers as `handler`, running `behaviour`
    (without the request deserializer when `parse_requests` is False)."""
    make = _MAKERS[(handler.request_streaming, handler.response_streaming)]
    parse = handler.request_deserializer if parse_requests else None
    return make(behaviour, parse, handler.response_serializer)


def refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
            message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with (code, message)."""

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request: object,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(code, message)
        yield  # makes this an async generator, as response-streaming handlers must be

    # No deserializer: a refused caller's bytes are never parsed, whatever their size.
    return with_behaviour(handler, streaming if handler.response_streaming else unary,
                          parse_requests=False)
