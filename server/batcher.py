"""Dynamic batching per model version: every caller's texts share the same batches.

Contract:
- Each text is one `WorkItem`; the caller owns its future and may cancel it at any time (an
  expired deadline or a dropped stream). Cancelled items are dropped before compute.
- A batch starts with the oldest item and fills with the waiting items closest to it in
  length (within a look-ahead window) that keep it under its token budget (longest sequence
  x count) and `max_batch_size`; the rest keep their places. The first item of a batch waits
  at most `max_queue_delay` for others to join.
- Up to `instances` batches run at once on worker threads; while they run, the loop already
  forms the next batch. Results are set on futures from the event loop thread only.
- A batch that raises is split in halves until the failing item is alone: only it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelNotReady, Overloaded
from .runtime import Batch
from .stages import CLOCK
from .tokenization import Encoded

__all__ = ["Batcher", "BatcherOptions", "WorkItem"]

RunFn = Callable[[Batch, Sequence[str]], dict[str, np.ndarray]]
# After each batch: the items' queue times, real tokens, padded tokens, inference seconds.
BatchObserver = Callable[[Sequence[float], int, int, float], None]
TOKEN_OUTPUT_PREFIX = "tokens_"


@dataclass(frozen=True)
class BatcherOptions:
    max_batch_size: int = 32
    max_batch_tokens: int = 32 * 512
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 2048
    instances: int = 1
    lookahead: int = 256  # waiting items the batcher may pick from to group similar lengths


@dataclass(eq=False)
class WorkItem:
    """One text on its way to the runtime; the future receives its rows of each output."""

    encoded: Encoded
    outputs: frozenset[str]
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued_at: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    infer_s: float = 0.0

    @property
    def length(self) -> int:
        return self.encoded.length


class Batcher:
    """The queue and batch loop of one model version."""

    def __init__(self, run: RunFn, options: BatcherOptions,
                 observer: BatchObserver | None = None) -> None:
        self._run_fn = run
        self.options = options
        self._observer = observer
        self._queue: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._space = asyncio.Condition()
        self._slots = asyncio.Semaphore(options.instances)
        self._executor = ThreadPoolExecutor(options.instances, thread_name_prefix="runtime")
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, items: Sequence[WorkItem], wait: bool) -> None:
        """Queue items; over the limit, fail fast (wait=False) or wait for room (streams)."""
        if self._closed:
            raise ModelNotReady("this model version is unloading; retry")
        started = CLOCK.start()
        limit = self.options.max_queue_size
        if len(self._queue) + len(items) > limit:
            if not wait:
                raise Overloaded(f"queue full ({len(self._queue)} texts waiting); retry later")
            async with self._space:
                # An empty queue admits any request, however large: it never waits forever.
                await self._space.wait_for(
                    lambda: not self._queue or len(self._queue) + len(items) <= limit
                )
            started = CLOCK.start()
        now = time.perf_counter()
        for item in items:
            item.enqueued_at = now
        self._queue.extend(items)
        self._wakeup.set()
        CLOCK.stop("batch", started)

    async def close(self) -> None:
        """Stop admitting, finish what is queued and running, then free the threads."""
        self._closed = True
        while self._queue or self._running:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            items = await self._next_batch()
            task = asyncio.create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _next_batch(self) -> list[WorkItem]:
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # cancelled while waiting
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_left = self._queue[0].enqueued_at + self.options.max_queue_delay_s
            wait_left -= time.perf_counter()
            if wait_left > 0 and not self._full():
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_left)
                continue
            started = CLOCK.start()
            items = self._take()
            CLOCK.stop("batch", started)
            if items:
                return items

    def _full(self) -> bool:
        if len(self._queue) >= self.options.max_batch_size:
            return True
        longest = max(item.length for item in self._queue)  # fewer than max_batch_size items
        return longest * (len(self._queue) + 1) > self.options.max_batch_tokens

    def _take(self) -> list[WorkItem]:
        """The oldest item and, from the next `lookahead` waiting, those closest to it in
        length that fit the budget: similar lengths cut padding, and the oldest item always
        goes, so nothing waits behind a stream of better-fitting texts. Only the head window
        is touched, so a long queue costs nothing per batch."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # cancelled while waiting
        if not self._queue:
            return []
        window = list(itertools.islice(self._queue, 0, 1 + self.options.lookahead))
        head = window[0]
        candidates = [item for item in window[1:] if not item.future.done()]
        by_fit = sorted(candidates, key=lambda item: abs(item.length - head.length))
        chosen, longest = [head], head.length
        for item in by_fit:
            if len(chosen) >= self.options.max_batch_size:
                break
            cost = max(longest, item.length) * (len(chosen) + 1)
            if cost <= self.options.max_batch_tokens:
                chosen.append(item)
                longest = max(longest, item.length)
        taken = {id(item) for item in chosen}
        kept = [item for item in window if id(item) not in taken and not item.future.done()]
        for _ in window:
            self._queue.popleft()
        self._queue.extendleft(reversed(kept))
        chosen.sort(key=lambda item: item.enqueued_at)
        self._notify_space()
        return chosen

    def _pad_and_run(self, encoded: list[Encoded],
                     outputs: Sequence[str]) -> tuple[Batch, dict[str, np.ndarray]]:
        started = CLOCK.start()
        batch = Batch.pad(encoded)
        CLOCK.stop("pad", started)
        return batch, self._run_fn(batch, outputs)

    def _notify_space(self) -> None:
        async def notify() -> None:
            async with self._space:
                self._space.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def _run(self, items: list[WorkItem]) -> None:
        start = time.perf_counter()
        for item in items:
            item.queue_s = start - item.enqueued_at
        outputs = sorted(set().union(*(item.outputs for item in items)))
        loop = asyncio.get_running_loop()
        encoded = [item.encoded for item in items]
        try:  # padding runs on the worker thread too: the event loop only routes results
            batch, arrays = await loop.run_in_executor(self._executor, self._pad_and_run,
                                                       encoded, outputs)
        except Exception as exc:
            if len(items) == 1:
                _fail(items, exc)
                return
            half = len(items) // 2
            await self._run(items[:half])
            await self._run(items[half:])
            return
        elapsed = time.perf_counter() - start
        started = CLOCK.start()
        if self._observer is not None:
            real = sum(item.length for item in items)
            self._observer([item.queue_s for item in items], real, batch.padded_tokens, elapsed)
        for row, item in enumerate(items):
            item.infer_s = elapsed
            if not item.future.done():
                item.future.set_result(_rows(arrays, item, row))
        CLOCK.stop("scatter", started)


def _rows(arrays: dict[str, np.ndarray], item: WorkItem, row: int) -> dict[str, np.ndarray]:
    return {
        name: arrays[name][row, : item.length] if name.startswith(TOKEN_OUTPUT_PREFIX)
        else arrays[name][row]
        for name in item.outputs
    }


def _fail(items: Iterable[WorkItem], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
