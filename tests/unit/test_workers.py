"""The event loop's worker threads: results, errors, and calls whose caller already left."""

from __future__ import annotations

import asyncio
import threading

import pytest
from bertstream.server.engine.workers import Workers


def test_results_errors_and_thread_names() -> None:
    async def main() -> None:
        workers = Workers(2, "tokenize")
        try:
            assert await workers.run(lambda a, b: a + b, 2, 3) == 5
            name = await workers.run(lambda: threading.current_thread().name)
            assert name.startswith("tokenize_")
            with pytest.raises(ValueError, match="bad text"):
                await workers.run(_raise, ValueError("bad text"))
        finally:
            workers.close()

    asyncio.run(main())


def test_a_call_cancelled_before_a_thread_takes_it_never_runs() -> None:
    async def main() -> None:
        workers = Workers(1, "runtime")
        gate, ran = threading.Event(), []
        try:
            busy = workers.run(gate.wait, 10)  # occupies the only thread
            queued = workers.run(ran.append, "queued")
            queued.cancel()
            gate.set()
            await busy
            assert await workers.run(lambda: "after") == "after"  # the thread went on
            assert ran == []
        finally:
            gate.set()
            workers.close()

    asyncio.run(main())


def _raise(exc: Exception) -> None:
    raise exc
