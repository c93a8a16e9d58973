"""The stage clock's gRPC edge: the request deserializer and response serializer ("decode",
"encode") run inside grpc's own code on the event loop, where only an interceptor can time them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ..stages import CLOCK
from .handlers import HandlerCache

__all__ = ["StageTiming"]


class StageTiming(grpc.aio.ServerInterceptor):
    """Times gRPC's request deserializer and response serializer ("decode", "encode"): they
    run on the event loop inside grpc's own code, where nothing else can time them."""

    def __init__(self) -> None:
        self._timed = HandlerCache(_with_timed_serializers)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._timed(handler)


def _with_timed_serializers(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """grpc's handlers are named tuples: the same handler, its (de)serializers timed."""
    parse, serialize = handler.request_deserializer, handler.response_serializer
    return handler._replace(
        request_deserializer=_timed("decode", parse) if parse else None,
        response_serializer=_timed("encode", serialize) if serialize else None)


def _timed(stage: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def timed(value: Any) -> Any:
        started = CLOCK.start()
        try:
            return fn(value)
        finally:
            CLOCK.stop(stage, started)

    return timed
