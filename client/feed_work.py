"""The feed's work queue: what is left to send, shared by all its streams.

Items sent back for a retry go first, then the input, read lazily (memory stays bounded by the
ids, not the texts). Every stream awaits `take` and reports each batch back with `settle`; the
feed is over when the input is exhausted and nothing is waiting for a retry or in flight. One
event loop, no threads: the condition is only about who waits for what."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

from .feed_input import Item

__all__ = ["Work"]


class Work:
    def __init__(self, items: Iterator[Item], batch_size: int) -> None:
        self._items = items
        self._batch_size = batch_size
        self._exhausted = False
        self._retry: deque[Item] = deque()
        self._in_flight = 0
        self._changed = asyncio.Condition()

    async def take(self) -> list[Item] | None:
        """The next batch (a solo item alone), waiting while others are in flight; None when
        everything is answered."""
        async with self._changed:
            while True:
                batch = self._take_now()
                if batch:
                    self._in_flight += len(batch)
                    return batch
                if self._exhausted and not self._retry and self._in_flight == 0:
                    return None
                await self._changed.wait()

    def _take_now(self) -> list[Item]:
        if self._retry:
            batch = [self._retry.popleft()]
            while (not batch[0].solo and self._retry and not self._retry[0].solo
                   and len(batch) < self._batch_size):
                batch.append(self._retry.popleft())
            return batch
        batch = []
        while not self._exhausted and len(batch) < self._batch_size:
            item = next(self._items, None)
            if item is None:
                self._exhausted = True
            else:
                batch.append(item)
        return batch

    async def settle(self, items: list[Item], retry: bool = False) -> None:
        """`items` left flight: answered, or (retry) to be sent again."""
        async with self._changed:
            self._in_flight -= len(items)
            if retry:
                self._retry.extend(items)
            self._changed.notify_all()
