"""Dynamic batching per model version: every caller's texts share the same batches.

Contract:
- A request (one unary call, or one stream message) is one `WorkItem` carrying all its texts,
  its priority level, its caller and one future; the caller owns the future and may cancel it
  at any time (an expired deadline or a dropped stream). The texts of a cancelled request are
  dropped before compute.
- Which waiting texts form the next batch is the `Scheduler`'s choice (scheduler.py): levels,
  fair turns between callers, sizes by the version's measured cost model, queue timeouts.
  This module only runs its choices: on the event loop, as late as possible (a batch is formed
  when a runtime slot is free, so a text that arrives while batches run can still go first).
- Up to `instances` batches run at once on worker threads. The worker that ran a batch also
  pads it and copies its output rows into each request's arrays (one per output per request),
  so the event loop's share of a request is one future, whatever its number of texts. Futures
  are set on the loop only.
- A batch that raises is split in halves until the failing text is alone: only its request
  fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EngineUnavailable, ModelNotReady, Overloaded, QueueTimeout
from ..stages import CLOCK
from ..tracing import TRACE, ItemTrace
from ..version_format import TOKEN_OUTPUT_PREFIX
from .batch import Batch, Encoded
from .costmodel import CostModel, measure
from .scheduler import BatcherOptions, Scheduler
from .scheduler import Text as _Text
from .workers import Workers

__all__ = ["Batcher", "WorkItem"]

RunFn = Callable[[Batch, Sequence[str]], dict[str, np.ndarray]]
# After each batch: the texts' queue times, real tokens, padded tokens, inference seconds.
BatchObserver = Callable[[Sequence[float], int, int, float], None]


@dataclass(eq=False)
class WorkItem:
    """One request's texts on their way to the runtime. Its future receives, per output, an
    array with one row per text (token outputs: a list of [tokens, dim] arrays)."""

    encoded: Encoded
    outputs: frozenset[str]
    future: asyncio.Future[dict[str, Any]]
    priority: int = 0  # level, 1 the highest; 0: the model's default level
    caller: Hashable | None = None  # whose turn its texts take (None: the request alone)
    timeout_s: float = 0.0  # the request's own queue timeout; 0: its level's policy
    enqueued_at: float = 0.0
    deadline: float = math.inf  # set when queued: past it, the queue policy applies
    queue_s: float = 0.0  # the longest wait of its texts
    infer_s: float = 0.0  # the longest batch its texts ran in
    left: int = field(init=False)  # texts not answered yet (worker threads, under a lock)
    results: dict[str, Any] = field(init=False, default_factory=dict)
    trace: ItemTrace | None = None  # a sampled request's engine spans (tracing.py)

    def __post_init__(self) -> None:
        self.left = len(self.encoded)


class Batcher:
    """The queue and batch loop of one model version."""

    def __init__(self, run: RunFn, options: BatcherOptions,
                 observer: BatchObserver | None = None, model: tuple[str, int] = ("", 0)
                 ) -> None:
        self._run_fn = run
        self.model = model  # (name, version), for traces
        self.options = options
        self._observer = observer
        self._scheduler = Scheduler(options)
        self._wakeup = asyncio.Event()
        self._space = asyncio.Condition()
        self._slots = asyncio.Semaphore(options.instances)
        self._workers = Workers(options.instances, "runtime")
        self._results_lock = threading.Lock()  # requests' rows may land from several workers
        self._running: set[asyncio.Task[None]] = set()
        self._waiting = 0  # submitters waiting for room in the queue
        self._paced: tuple[float, float] | None = None  # a backlogged batch: start, predicted
        self._closed = False
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def queued(self) -> int:
        return len(self._scheduler)

    def queued_at(self, level: int) -> int:
        return self._scheduler.waiting(level)

    @property
    def cost(self) -> CostModel | None:
        """What a batch costs on this version's engine, once `calibrate` measured it."""
        return self._scheduler.cost

    async def calibrate(self, ids: np.ndarray, outputs: Sequence[str],
                        max_length: int) -> CostModel:
        """Measure the cost model on the runtime itself (worker thread) and size batches by
        it from now on. `ids`: real token ids to fill the batches with."""

        def run(size: int, length: int) -> None:
            row = np.resize(ids, length)
            encoded = Encoded(np.tile(row, size), [length] * size,
                              [i * length for i in range(size)], [0] * size)
            self._run_fn(Batch.of(encoded), outputs)

        options = self.options
        cost = await self._workers.run(measure, run, options.max_batch_size, max_length,
                                       options.max_batch_tokens)
        self._scheduler.cost = cost
        return cost

    async def submit(self, items: Sequence[WorkItem], wait: bool) -> None:
        """Queue items; over the limit, fail fast (wait=False) or wait for room (streams)."""
        if self.offer(items, wait):
            return
        self._waiting += 1
        try:
            async with self._space:
                await self._space.wait_for(lambda: self._scheduler.room(items))
        finally:
            self._waiting -= 1
        self._enqueue(items)

    def offer(self, items: Sequence[WorkItem], wait: bool) -> bool:
        """Queue items if there is room, without awaiting; False when the caller must wait
        for room (wait=True), Overloaded when it may not (wait=False)."""
        if self._closed:
            raise ModelNotReady("this model version is unloading; retry")
        refusal = self._scheduler.refusal(items)
        if refusal is not None:
            if not wait:
                raise Overloaded(f"{refusal}; retry later")
            return False
        self._enqueue(items)
        return True

    def _enqueue(self, items: Sequence[WorkItem]) -> None:
        started = CLOCK.start()
        now = time.perf_counter()
        for item in items:
            self._scheduler.add(item, now)
            # A caller that goes away frees its texts' room: wake the loop to drop them and
            # let streams waiting for room in (it would otherwise sleep until the next call).
            item.future.add_done_callback(self._on_done)
        if TRACE.on:
            TRACE.enqueued(items)
        self._wakeup.set()
        CLOCK.stop("batch", started)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() and self._waiting:  # otherwise the next batch drops them
            self._wakeup.set()

    async def close(self) -> None:
        """Stop admitting, finish what is queued and running, then free the threads."""
        self._closed = True
        while self._scheduler or self._running:
            if self._loop_task.done():  # it died: nothing will take what still waits
                while texts := self._scheduler.take():
                    for _, item, _ in texts:
                        if not item.future.done():
                            item.future.set_exception(EngineUnavailable("the batcher stopped"))
                if not self._running:
                    break
            self._wakeup.set()
            await asyncio.sleep(0.005)
        self._loop_task.cancel()
        self._workers.close()

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            texts = await self._next_batch()
            task = asyncio.create_task(self._run(texts))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _next_batch(self) -> list[_Text]:
        scheduler = self._scheduler
        while True:
            now = time.perf_counter()
            before = len(scheduler)
            expired = scheduler.expire(now)
            for item in expired:
                _fail(item, QueueTimeout(
                    f"waited in the queue past its timeout ({_ms(now - item.enqueued_at)}, "
                    f"priority level {scheduler.level_of(item)}); retry or lower the load"))
            wait_s = scheduler.ready_in(now)  # drops cancelled requests' texts it meets
            if len(scheduler) < before:  # timed out or cancelled texts left: room for others
                self._notify_space()
            if wait_s > 0:
                self._paced = None  # the engine idles: the next batch is not back to back
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(),
                                           None if math.isinf(wait_s) else wait_s)
                continue
            started = CLOCK.start()
            texts = scheduler.take()
            CLOCK.stop("batch", started)
            self._notify_space()
            if texts:
                self._pace(texts)
                return texts

    def _pace(self, texts: list[_Text]) -> None:
        """Tell the scheduler how long the engine really took per predicted second: while a
        backlog waits, batches start back to back, so the time from one batch's start to
        the next (times the instances sharing the work) is what the previous one cost,
        with everything warm-up could not see (threads and callers competing for the cores,
        the loop's own turns)."""
        cost = self._scheduler.cost
        if cost is None:
            return
        now = time.perf_counter()
        if self._paced is not None:
            previous_start, predicted = self._paced
            self._scheduler.observe(predicted, (now - previous_start) * self.options.instances)
        padded = len(texts) * max(length for length, _, _ in texts)
        # Only a batch with texts still waiting behind it is followed back to back.
        self._paced = (now, cost.seconds(padded)) if len(self._scheduler) else None

    def _notify_space(self) -> None:
        if not self._waiting:  # nobody waits for room: no task to schedule
            return

        async def notify() -> None:
            async with self._space:
                self._space.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def _run(self, texts: list[_Text]) -> None:
        start = time.perf_counter()
        try:  # padding, compute and scatter run on the worker: the loop sets futures only
            answered = await self._workers.run(self._compute, texts, start)
        except Exception as exc:
            if TRACE.on:
                TRACE.batch(texts, start, self.model, exc)
            if len(texts) == 1:
                _fail(texts[0][1], exc)
                return
            half = len(texts) // 2
            await self._run(texts[:half])
            await self._run(texts[half:])
            return
        if TRACE.on:  # its span, and the queue and run spans of the requests it carried
            TRACE.batch(texts, start, self.model)
        started = CLOCK.start()
        for item in answered:
            if not item.future.done():
                item.future.set_result(item.results)
        CLOCK.stop("resolve", started)

    def _compute(self, texts: list[_Text], start: float) -> list[WorkItem]:
        """On a worker thread: pad, run, copy each request's rows into its arrays; returns
        the requests whose last text this batch answered."""
        started = CLOCK.start()
        batch = Batch.pad([(item.encoded, index) for _, item, index in texts])
        # Rows of this batch per request: (rows in the batch, indices in the request).
        groups: dict[WorkItem, tuple[list[int], list[int]]] = {}
        for row, (_, item, index) in enumerate(texts):
            rows = groups.get(item)
            if rows is None:
                rows = groups[item] = ([], [])
            rows[0].append(row)
            rows[1].append(index)
        outputs = sorted(set().union(*(item.outputs for item in groups)))
        CLOCK.stop("pad", started)
        arrays = self._run_fn(batch, outputs)
        elapsed = time.perf_counter() - start
        started = CLOCK.start()
        answered = []
        with self._results_lock:
            for item, (rows, indices) in groups.items():
                if item.future.done():  # cancelled, or failed in another batch
                    continue
                _scatter(item, arrays, rows, indices)
                item.queue_s = max(item.queue_s, start - item.enqueued_at)
                item.infer_s = max(item.infer_s, elapsed)
                item.left -= len(indices)
                if item.left == 0:
                    answered.append(item)
        if self._observer is not None:
            queue_s = [start - item.enqueued_at for _, item, _ in texts]
            real = sum(length for length, _, _ in texts)
            self._observer(queue_s, real, batch.padded_tokens, elapsed)
        CLOCK.stop("scatter", started)
        return answered


def _scatter(item: WorkItem, arrays: dict[str, np.ndarray], rows: list[int],
             indices: list[int]) -> None:
    """Copy this batch's rows of `item` into its per-request arrays."""
    for name in item.outputs:
        array = arrays[name]
        if name.startswith(TOKEN_OUTPUT_PREFIX):  # one [tokens, dim] array per text
            vectors = item.results.setdefault(name, [None] * len(item.encoded))
            lengths = item.encoded.lengths
            for row, index in zip(rows, indices, strict=True):
                vectors[index] = array[row, :lengths[index]]
            continue
        target = item.results.get(name)
        if target is None:
            target = item.results[name] = np.empty((len(item.encoded), *array.shape[1:]),
                                                   dtype=array.dtype)
        target[indices] = array[rows]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _fail(item: WorkItem, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
