"""The error taxonomy: every failure a caller can see, with its gRPC status code.

Raised anywhere in the core; mapped to a status in exactly one place (`to_status`) so a server
fault is never reported as the caller's fault and no traceback reaches a client.
"""

from __future__ import annotations

import logging

import grpc

__all__ = [
    "ENGINE_GONE",
    "BertstreamError",
    "EngineUnavailable",
    "InputTooLong",
    "InvalidInput",
    "LoadFailed",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PermissionDenied",
    "QueueTimeout",
    "ShuttingDown",
    "Unauthenticated",
    "Unsupported",
    "WrongControlMode",
    "check_explicit",
    "error_by_name",
    "to_status",
]

log = logging.getLogger(__name__)


class BertstreamError(Exception):
    """Base of every error whose message is safe and useful to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(BertstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InputTooLong(InvalidInput):
    """A text longer than the model's limit, sent without `truncate`."""


class ModelNotFound(BertstreamError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(BertstreamError):
    code = grpc.StatusCode.UNAVAILABLE


class LoadFailed(BertstreamError):
    """An explicit LoadModel whose model has no version that loads (the reason says why)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WrongControlMode(BertstreamError):
    """LoadModel / UnloadModel on a server not started with --model-control-mode explicit."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def check_explicit(control_mode: str, rpc: str) -> None:
    """Model control rpcs (BertService's and KServe's) need explicit mode."""
    if control_mode != "explicit":
        raise WrongControlMode(
            f"{rpc} needs a server started with --model-control-mode explicit (this one "
            f"runs in mode {control_mode!r})")


class Overloaded(BertstreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueTimeout(BertstreamError):
    """Texts that waited in the queue past their timeout (the level's queue policy, or the
    request's own `timeout`): Triton's REJECT action."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ShuttingDown(BertstreamError):
    """A call that reached the server after SIGTERM (server/api/shutdown.py): try another
    replica."""

    code = grpc.StatusCode.UNAVAILABLE


ENGINE_GONE = "the engine process is restarting; retry"


class EngineUnavailable(BertstreamError):
    """A front-end process whose engine process died or restarts
    (server/processes/frontend_process.py): calls in flight on it end with this, and new ones
    until the engine serves again; retry."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str = ENGINE_GONE) -> None:
        super().__init__(message)


class Unauthenticated(BertstreamError):
    """No bearer token, or one the server does not know (server/api/security.py)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BertstreamError):
    """A known token whose scope does not cover the rpc (inference token on LoadModel)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unsupported(BertstreamError):
    code = grpc.StatusCode.UNIMPLEMENTED


def error_by_name(name: str, message: str) -> BertstreamError:
    """Rebuild an error another process of this server raised (its class name and message);
    a name this module does not know is a server fault."""
    kinds: list[type[BertstreamError]] = [BertstreamError]
    while kinds:
        kind = kinds.pop()
        if kind.__name__ == name:
            return kind(message)
        kinds.extend(kind.__subclasses__())
    return BertstreamError("internal server error")


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the (code, message) a caller sees.

    Unknown exceptions are server faults: logged here with their traceback, answered INTERNAL
    with an opaque message.
    """
    if isinstance(exc, BertstreamError):
        return exc.code, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error"
