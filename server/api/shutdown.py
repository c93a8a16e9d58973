"""Graceful shutdown on SIGTERM: refuse new work, let admitted calls end, then close.

grpc.aio's `server.stop(grace)` closes every connection the moment its last call ends. A
caller still writing into a stream that has just ended then meets a TCP reset, and the reset
can throw away what sat unread in the caller's socket: the stream's last answers and its
status. The caller saw "Stream removed (Broken pipe)" instead of "shutting down", and could not
tell which messages were answered. So the server stops in steps, as Triton and TEI do:

1. `draining` is set: health reports NOT_SERVING, new calls (all but probes) are refused
   UNAVAILABLE by `ShutdownGate`, and open streams stop reading, answer what they read and
   end UNAVAILABLE (streams.py);
2. the gate waits until no admitted call is running and no call has come in for a short
   linger (at most the grace period): the last statuses reach their callers, who stop
   writing, and calls already sent get the gate's UNAVAILABLE, not server.stop's CANCELLED;
3. only then `server.stop` closes the connections. Probe streams (health Watch) are not
   counted and would hold `server.stop` for its whole grace, so when no admitted call is
   left it gets at most `CLOSE_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..errors import ShuttingDown
from .handlers import HandlerCache, behaviour_of, is_probe, refusal, with_behaviour

__all__ = ["CLOSE_GRACE_S", "ShutdownGate"]

# Quiet time before closing: loopback and LAN round trips are far below it, and it leaves
# room for a busy event loop to refuse calls already sent.
LINGER_S = 0.5
# server.stop's grace once every admitted call has ended: what is left are probe streams.
CLOSE_GRACE_S = 1.0


class ShutdownGate(grpc.aio.ServerInterceptor):
    """Counts running calls, refuses new ones once `draining` is set, and waits for the
    count to reach zero."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_call = 0.0  # monotonic time the last non-probe call came in
        self._wrapped = HandlerCache(self._counted)

    @property
    def running(self) -> int:
        """Admitted calls whose handler has not returned yet (probes are not counted)."""
        return self._running

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or is_probe(handler_call_details.method):  # type: ignore[attr-defined]
            return handler
        self._last_call = time.monotonic()
        if self.draining.is_set():
            error = ShuttingDown("server is shutting down; send this call to another replica")
            return refusal(handler, error.code, str(error))
        return self._wrapped(handler)

    async def drain(self, grace_s: float, linger_s: float = LINGER_S) -> float:
        """Refuse new calls and wait for the running ones (at most `grace_s`), then linger.
        Returns the seconds of grace left for `server.stop`."""
        deadline = time.monotonic() + grace_s
        self.draining.set()
        # Done when no call runs and none has come in (admitted or refused) for `linger_s`.
        # A unary call is counted once its request has arrived, so one admitted just before
        # the drain can start during the linger; and a caller that sends its next call as
        # soon as one is answered must get its refusal before server.stop, which would
        # cancel that call (CANCELLED) instead of letting the gate answer it UNAVAILABLE.
        while True:
            try:  # asyncio.TimeoutError: the builtin TimeoutError only from Python 3.11
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return 0.0
            quiet_until = max(time.monotonic(), self._last_call) + linger_s
            while (now := time.monotonic()) < min(quiet_until, deadline):
                await asyncio.sleep(min(quiet_until, deadline) - now)
                quiet_until = self._last_call + linger_s
            if not self._running:
                return max(0.0, deadline - time.monotonic())
            if time.monotonic() >= deadline:
                return 0.0

    def _enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler, its behaviour bracketed by enter / leave (also when cancelled).
        A response stream is an async generator, or a coroutine that uses context.write."""
        behaviour = behaviour_of(handler)
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: grpc.aio.ServicerContext,
                                ) -> AsyncIterator[Any]:
                self._enter()
                try:  # aclosing: a caller who leaves closes the inner stream now, not at GC
                    async with contextlib.aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    self._leave()

            return with_behaviour(handler, streaming)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()

        return with_behaviour(handler, counted)
