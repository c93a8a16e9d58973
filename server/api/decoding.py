"""Request bytes that are not the request message: INVALID_ARGUMENT, named, no traceback.

grpc.aio deserializes a unary request before any handler runs, and a DecodeError there comes
back as UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>" with a traceback
in the log. This interceptor gives unary-request handlers a deserializer that does not raise,
and a behaviour that answers such a request INVALID_ARGUMENT. Streams handle the same case in
streams.py (the stream ends INVALID_ARGUMENT at the bad message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .handlers import HandlerCache

__all__ = ["DecodeGuard"]


class _Malformed:
    """What the guarded deserializer returns for bytes that do not parse."""


_MALFORMED = _Malformed()


def _type_name(deserializer: Callable[[bytes], Any] | None) -> str:
    message = getattr(deserializer, "__self__", None)
    descriptor = getattr(message, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "the request message"


class DecodeGuard(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._guarded = HandlerCache(_guard)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming \
                or handler.request_deserializer is None:
            return handler
        return self._guarded(handler)


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that does not raise and an INVALID_ARGUMENT answer for
    bytes that do not parse."""
    parse = handler.request_deserializer
    behaviour = handler.unary_unary
    message = (f"the request does not parse as {_type_name(parse)}: it is not a "
               "protobuf message of that type")

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _MALFORMED

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _MALFORMED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(guarded, deserialize,
                                               handler.response_serializer)
