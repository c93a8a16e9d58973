"""Threads that run blocking calls for the event loop: tokenization and batches.

Why not `loop.run_in_executor(ThreadPoolExecutor)`: per call it takes two locks and a
Python-level semaphore in `submit`, then chains a concurrent future to an asyncio one; at a
few hundred requests a second that hand-off was 7 % of the event loop's GIL time (py-spy).
Here a call is one `SimpleQueue.put` (C) on the loop and one `call_soon_threadsafe` back.

Contract: `run` must be called on the event loop; the returned future is resolved on that
loop. A call whose future was cancelled before a thread took it is skipped (a request that
left costs no tokenization). `close` lets the threads finish what they run and stop; they
are daemons, so a hung call never holds the process at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Workers"]

T = TypeVar("T")
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Workers:
    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(max(1, count))]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            if future.cancelled():  # a benign cross-thread read: at worst the call runs
                continue
            try:
                result = fn(*args)
            except Exception as exc:  # it belongs to the caller
                _deliver(loop, future.set_exception, future, exc)
            else:
                _deliver(loop, future.set_result, future, result)


def _deliver(loop: asyncio.AbstractEventLoop, setter: Callable[[Any], None],
             future: asyncio.Future[Any], value: Any) -> None:
    def settle() -> None:
        if not future.done():  # cancelled while the call ran
            setter(value)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
        loop.call_soon_threadsafe(settle)
