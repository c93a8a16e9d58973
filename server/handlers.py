"""gRPC method handlers made by interceptors: which calls are probes, and a refusal of any
shape. Shared by the token check (security.py) and the shutdown gate (shutdown.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

__all__ = ["is_probe", "refusal"]

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
    args = (None, handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, *args)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, *args)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, *args)
    return grpc.unary_unary_rpc_method_handler(unary, *args)
