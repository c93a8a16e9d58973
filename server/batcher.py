"""Dynamic batching per model version: every caller's texts share the same batches.

Contract:
- A request (one unary call, or one stream message) is one `WorkItem` carrying all its texts
  and one future; the caller owns the future and may cancel it at any time (an expired
  deadline or a dropped stream). The texts of a cancelled request are dropped before compute.
- The queue holds texts, not requests: a batch starts with the oldest text and fills with
  the waiting texts closest to it in length (within a look-ahead window) that keep it under
  its token budget (longest sequence x count) and `max_batch_size`; the rest keep their
  places. The first text of a batch waits at most `max_queue_delay` for others to join.
- Up to `instances` batches run at once on worker threads; while they run, the loop already
  forms the next batch. The worker that ran a batch also pads it and copies its output rows
  into each request's arrays (one per output per request), so the event loop's share of a
  request is one future, whatever its number of texts. Futures are set on the loop only.
- A batch that raises is split in halves until the failing text is alone: only its request
  fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelNotReady, Overloaded
from .runtime import Batch
from .stages import CLOCK
from .tokenization import Encoded
from .version_format import TOKEN_OUTPUT_PREFIX
from .workers import Workers

__all__ = ["Batcher", "BatcherOptions", "WorkItem"]

RunFn = Callable[[Batch, Sequence[str]], dict[str, np.ndarray]]
# After each batch: the texts' queue times, real tokens, padded tokens, inference seconds.
BatchObserver = Callable[[Sequence[float], int, int, float], None]


@dataclass(frozen=True)
class BatcherOptions:
    max_batch_size: int = 32
    max_batch_tokens: int = 32 * 512
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 2048  # texts
    instances: int = 1
    lookahead: int = 256  # waiting texts the batcher may pick from to group similar lengths


@dataclass(eq=False)
class WorkItem:
    """One request's texts on their way to the runtime. Its future receives, per output, an
    array with one row per text (token outputs: a list of [tokens, dim] arrays)."""

    encoded: Encoded
    outputs: frozenset[str]
    future: asyncio.Future[dict[str, Any]]
    enqueued_at: float = 0.0
    queue_s: float = 0.0  # the longest wait of its texts
    infer_s: float = 0.0  # the longest batch its texts ran in
    left: int = field(init=False)  # texts not answered yet (worker threads, under a lock)
    results: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.left = len(self.encoded)


# One waiting text: (its length, its request, its index in the request).
_Text = tuple[int, WorkItem, int]


class Batcher:
    """The queue and batch loop of one model version."""

    def __init__(self, run: RunFn, options: BatcherOptions,
                 observer: BatchObserver | None = None) -> None:
        self._run_fn = run
        self.options = options
        self._observer = observer
        self._queue: deque[_Text] = deque()
        self._wakeup = asyncio.Event()
        self._space = asyncio.Condition()
        self._slots = asyncio.Semaphore(options.instances)
        self._workers = Workers(options.instances, "runtime")
        self._results_lock = threading.Lock()  # requests' rows may land from several workers
        self._running: set[asyncio.Task[None]] = set()
        self._waiting = 0  # submitters waiting for room in the queue
        self._closed = False
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, items: Sequence[WorkItem], wait: bool) -> None:
        """Queue items; over the limit, fail fast (wait=False) or wait for room (streams)."""
        if self.offer(items, wait):
            return
        count = sum(len(item.encoded) for item in items)
        limit = self.options.max_queue_size
        self._waiting += 1
        try:
            async with self._space:
                # An empty queue admits any request, however large: never waits forever.
                await self._space.wait_for(
                    lambda: not self._queue or len(self._queue) + count <= limit
                )
        finally:
            self._waiting -= 1
        self._enqueue(items)

    def offer(self, items: Sequence[WorkItem], wait: bool) -> bool:
        """Queue items if there is room, without awaiting; False when the caller must wait
        for room (wait=True), Overloaded when it may not (wait=False)."""
        if self._closed:
            raise ModelNotReady("this model version is unloading; retry")
        count = sum(len(item.encoded) for item in items)
        if self._queue and len(self._queue) + count > self.options.max_queue_size:
            if not wait:
                raise Overloaded(f"queue full ({len(self._queue)} texts waiting); retry later")
            return False
        self._enqueue(items)
        return True

    def _enqueue(self, items: Sequence[WorkItem]) -> None:
        started = CLOCK.start()
        now = time.perf_counter()
        for item in items:
            item.enqueued_at = now
            self._queue.extend(zip(item.encoded.lengths, itertools.repeat(item),
                                   range(len(item.encoded))))
        self._wakeup.set()
        CLOCK.stop("batch", started)

    async def close(self) -> None:
        """Stop admitting, finish what is queued and running, then free the threads."""
        self._closed = True
        while self._queue or self._running:
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
        while True:
            while self._queue and self._queue[0][1].future.done():
                self._queue.popleft()  # cancelled while waiting
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_left = self._queue[0][1].enqueued_at + self.options.max_queue_delay_s
            wait_left -= time.perf_counter()
            if wait_left > 0 and not self._full():
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_left)
                continue
            started = CLOCK.start()
            texts = self._take()
            CLOCK.stop("batch", started)
            if texts:
                return texts

    def _full(self) -> bool:
        if len(self._queue) >= self.options.max_batch_size:
            return True
        longest = max(text[0] for text in self._queue)  # fewer than max_batch_size texts
        return longest * (len(self._queue) + 1) > self.options.max_batch_tokens

    def _take(self) -> list[_Text]:
        """The oldest text and, from the next `lookahead` waiting, those closest to it in
        length that fit the budget: similar lengths cut padding, and the oldest text always
        goes, so nothing waits behind a stream of better-fitting texts. Only the head window
        is touched, so a long queue costs nothing per batch."""
        while self._queue and self._queue[0][1].future.done():
            self._queue.popleft()  # cancelled while waiting
        if not self._queue:
            return []
        window = list(itertools.islice(self._queue, 0, 1 + self.options.lookahead))
        head = window[0]
        size, budget = self.options.max_batch_size, self.options.max_batch_tokens
        live = [text for text in window[1:] if not text[1].future.done()]
        target = head[0]
        live.sort(key=lambda text: abs(text[0] - target))
        chosen, longest = {id(head)}, target
        for text in live:
            if len(chosen) >= size:
                break
            new_longest = text[0] if text[0] > longest else longest
            if new_longest * (len(chosen) + 1) <= budget:
                chosen.add(id(text))
                longest = new_longest
        taken = [text for text in window if id(text) in chosen]  # in queue order
        kept = [text for text in window
                if id(text) not in chosen and not text[1].future.done()]
        for _ in window:
            self._queue.popleft()
        self._queue.extendleft(reversed(kept))
        self._notify_space()
        return taken

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
            if len(texts) == 1:
                _fail(texts[0][1], exc)
                return
            half = len(texts) // 2
            await self._run(texts[:half])
            await self._run(texts[half:])
            return
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


def _fail(item: WorkItem, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
