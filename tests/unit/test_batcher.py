"""Batch formation against a fake runtime whose progress is driven by events, not sleeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest
from bertstream.server.engine.batch import Batch, Encoded
from bertstream.server.engine.batcher import Batcher, WorkItem
from bertstream.server.engine.scheduler import BatcherOptions
from bertstream.server.errors import EngineUnavailable, Overloaded, QueueTimeout

POISON = 666


class FakeRuntime:
    """Vector of an item = [sum of its ids, its length]; records every batch it sees."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []  # first id of each row

    def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        if (batch.input_ids == POISON).any():
            raise RuntimeError("poisoned row")
        self.batches.append([int(row[0]) for row in batch.input_ids])
        ids = batch.input_ids * batch.attention_mask
        vec = np.stack([ids.sum(1), batch.attention_mask.sum(1)], axis=1).astype(np.float32)
        tokens = np.repeat(vec[:, None, :], batch.input_ids.shape[1], axis=1)
        return {name: tokens if name.startswith("tokens_") else vec for name in outputs}


def request(*texts: tuple[int, int], outputs: frozenset[str] = frozenset({"mean_layer1"})
            ) -> WorkItem:
    """A request of texts given as (first id, length); the other ids are 1."""
    rows = []
    for first_id, length in texts:
        ids = np.full(length, 1, dtype=np.int64)
        ids[0] = first_id
        rows.append(ids)
    lengths = [len(r) for r in rows]
    starts = [sum(lengths[:i]) for i in range(len(rows))]
    enc = Encoded(np.concatenate(rows), lengths, starts, [0] * len(rows))
    return WorkItem(enc, outputs, asyncio.get_running_loop().create_future())


def item(first_id: int, length: int) -> WorkItem:
    return request((first_id, length))


async def blocked_first_batch(fake: FakeRuntime, batcher: Batcher) -> WorkItem:
    """Occupy the only instance so that later items queue up together."""
    fake.gate.clear()
    first = item(1, 2)
    await batcher.submit([first], wait=False)
    await asyncio.to_thread(fake.entered.wait, 10)
    return first


def run(coro_fn, **options: object) -> FakeRuntime:  # type: ignore[no-untyped-def]
    fake = FakeRuntime()

    async def main() -> None:
        batcher = Batcher(fake.run, BatcherOptions(max_queue_delay_s=0, **options))  # type: ignore[arg-type]
        try:
            await coro_fn(fake, batcher)
        finally:
            fake.gate.set()
            await batcher.close()

    asyncio.run(main())
    return fake


def test_callers_share_a_batch_and_get_their_own_rows() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        callers = [[item(10 + c * 10 + i, 3 + c) for i in range(2)] for c in range(3)]
        for items in callers:
            await batcher.submit(items, wait=False)
        fake.gate.set()
        await first.future
        for c, items in enumerate(callers):
            for i, it in enumerate(items):
                row = (await it.future)["mean_layer1"][0]
                assert row.tolist() == [10 + c * 10 + i + 2 + c, 3 + c]
        assert fake.batches[1] == [10, 11, 20, 21, 30, 31]

    run(body)


def test_token_budget_and_batch_size_bound_each_batch_without_reordering() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        items = [item(100, 4), item(101, 16), item(102, 4), item(103, 4), item(104, 4)]
        await batcher.submit(items, wait=False)
        fake.gate.set()
        await asyncio.gather(first.future, *(i.future for i in items))
        # budget 16: the 16-token item cannot join 4-token ones; max 3 items per batch
        assert fake.batches[1:] == [[100, 102, 103], [101], [104]]

    run(body, max_batch_tokens=16, max_batch_size=3)


def test_cancelled_items_cost_no_compute() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        keep, drop = item(200, 3), item(201, 3)
        await batcher.submit([drop, keep], wait=False)
        drop.future.cancel()
        fake.gate.set()
        await asyncio.gather(first.future, keep.future)
        assert all(201 not in b for b in fake.batches)

    run(body)


def test_a_failing_item_fails_alone() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        items = [item(300 + i, 3) for i in range(5)]
        bad = item(POISON, 3)
        await batcher.submit([*items[:2], bad, *items[2:]], wait=False)
        fake.gate.set()
        await first.future
        for it in items:
            assert (await it.future)["mean_layer1"][0, 1] == 3
        with pytest.raises(RuntimeError, match="poisoned"):
            await bad.future

    run(body)


def test_full_queue_fails_fast_for_unary_and_waits_for_streams() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        queued = [item(400, 2), item(401, 2)]
        await batcher.submit(queued, wait=False)
        with pytest.raises(Overloaded):
            await batcher.submit([item(402, 2)], wait=False)
        late = item(403, 2)
        waiter = asyncio.create_task(batcher.submit([late], wait=True))
        await asyncio.sleep(0)
        assert not waiter.done()
        fake.gate.set()
        await waiter
        await asyncio.gather(first.future, late.future, *(i.future for i in queued))

    run(body, max_queue_size=2, max_batch_size=1)


def test_a_stream_waiting_for_room_gets_in_when_queued_callers_go_away() -> None:
    """Cancelled requests' texts leave the queue without a batch: the stream waiting for
    room must hear of it, not sleep until some other call arrives."""
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        queued = [item(400, 2), item(401, 2)]
        await batcher.submit(queued, wait=False)
        late = item(403, 2)
        waiter = asyncio.create_task(batcher.submit([late], wait=True))
        await asyncio.sleep(0)
        assert not waiter.done()
        for gone in queued:
            gone.future.cancel()
        fake.gate.set()
        await asyncio.wait_for(waiter, 5)
        await asyncio.wait_for(asyncio.gather(first.future, late.future), 5)
        assert [400] not in fake.batches and [401] not in fake.batches

    run(body, max_queue_size=2, max_batch_size=1)


def test_similar_lengths_share_a_batch_and_the_oldest_always_goes() -> None:
    """Queued lengths 10, 100, 12, 98, 11, 99 with 3 per batch: the oldest (10) takes the two
    closest to it (11, 12), then 100 takes 98 and 99: padding 2 + 2 tokens instead of 178."""
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        lengths = [10, 100, 12, 98, 11, 99]
        items = [item(20 + i, n) for i, n in enumerate(lengths)]
        for it in items:
            await batcher.submit([it], wait=False)
        fake.gate.set()
        await first.future
        for it in items:
            await it.future

    fake = run(body, max_batch_size=3)
    firsts = [sorted(batch) for batch in fake.batches[1:]]
    assert firsts == [[20, 22, 24], [21, 23, 25]], fake.batches


def test_a_text_over_the_token_budget_still_runs_alone() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        big = item(30, 50)
        await batcher.submit([big], wait=False)
        assert (await big.future)["mean_layer1"][0, 1] == 50

    fake = run(body, max_batch_tokens=16)
    assert fake.batches == [[30]]


def test_a_request_split_over_batches_gets_its_rows_back_in_its_order() -> None:
    """Texts of one request spread over several batches (3 per batch, similar lengths first)
    come back as one array in the request's own order; a second request shares the batches."""
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        texts = [(40, 9), (41, 30), (42, 10), (43, 31), (44, 11)]
        mine, other = request(*texts), request((50, 30), (51, 10))
        await batcher.submit([mine, other], wait=False)
        fake.gate.set()
        await first.future
        rows = (await mine.future)["mean_layer1"]
        assert rows.tolist() == [[first_id + n - 1, n] for first_id, n in texts]
        assert (await other.future)["mean_layer1"].tolist() == [[50 + 29, 30], [51 + 9, 10]]
        assert len(fake.batches) >= 3  # the request really was split

    run(body, max_batch_size=3)


def test_one_bad_text_fails_its_request_and_no_other() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        bad = request((60, 3), (POISON, 3), (61, 3))
        good = request((62, 3), (63, 3))
        await batcher.submit([bad, good], wait=False)
        fake.gate.set()
        await first.future
        with pytest.raises(RuntimeError, match="poisoned"):
            await bad.future
        assert (await good.future)["mean_layer1"][:, 1].tolist() == [3, 3]

    run(body)


def test_token_outputs_come_back_per_text_at_their_own_length() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        it = request((70, 2), (71, 5), outputs=frozenset({"tokens_layer1", "mean_layer1"}))
        await batcher.submit([it], wait=False)
        got = await it.future
        assert [v.shape[0] for v in got["tokens_layer1"]] == [2, 5]
        assert got["mean_layer1"].shape == (2, 2)

    run(body)


def test_the_queue_limit_counts_texts_not_requests() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        await batcher.submit([request((80, 2), (81, 2))], wait=False)
        assert batcher.queued == 2
        with pytest.raises(Overloaded, match="2 texts waiting"):
            await batcher.submit([request((82, 2))], wait=False)
        fake.gate.set()
        await first.future

    run(body, max_queue_size=2, max_batch_size=1)


# -- priorities, fair turns, cost-sized batches, queue timeouts (scheduler.py) -------------

def leveled(first_id: int, length: int, level: int, caller: str | None = None,
            timeout_s: float = 0.0) -> WorkItem:
    it = item(first_id, length)
    it.priority, it.caller, it.timeout_s = level, caller, timeout_s
    return it


def test_a_high_level_text_behind_500_low_level_ones_runs_in_the_next_batch() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        bulk = [leveled(1000 + i, 3, level=2, caller="feed") for i in range(500)]
        await batcher.submit(bulk, wait=True)
        urgent = leveled(7, 3, level=1, caller="ui")
        await batcher.submit([urgent], wait=False)
        fake.gate.set()
        await asyncio.gather(first.future, urgent.future, *(b.future for b in bulk))
        assert fake.batches[1] == [7]  # alone: its level has nothing else
        assert len(fake.batches) == 2 + 500 // 32 + 1

    run(body, max_queue_size=1024)


def test_a_low_level_is_never_starved_by_a_busy_high_one() -> None:
    """Level 1 always has work; level 2 still runs every (max_skipped_batches + 1)th batch."""
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        urgent = [leveled(100 + i, 3, level=1, caller="ui") for i in range(12)]
        bulk = [leveled(500 + i, 3, level=2, caller="feed") for i in range(3)]
        await batcher.submit(urgent + bulk, wait=False)
        fake.gate.set()
        await asyncio.gather(first.future, *(i.future for i in urgent + bulk))
        kinds = ["bulk" if b[0] >= 500 else "ui" for b in fake.batches[1:]]
        assert kinds[:12] == ["ui", "ui", "ui", "ui", "bulk"] * 2 + ["ui", "ui"]

    run(body, max_batch_size=1, max_skipped_batches=4)


def test_two_feeds_of_one_level_share_every_batch() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        a = [leveled(100 + i, 3, level=2, caller="A") for i in range(40)]
        b = [leveled(300 + i, 3, level=2, caller="B") for i in range(40)]
        await batcher.submit(a, wait=False)  # all of A arrives first
        await batcher.submit(b, wait=False)
        fake.gate.set()
        await asyncio.gather(first.future, *(i.future for i in a + b))
        for batch in fake.batches[1:5]:
            assert sum(x < 300 for x in batch) == sum(x >= 300 for x in batch) == 4

    run(body, max_batch_size=8)


def test_batches_are_sized_by_the_measured_cost_model() -> None:
    """A fake engine whose fixed cost is nothing beside its per-token cost (a CPU's shape):
    calibrate finds that, and bulk batches shrink from 32 texts to a few."""
    import time

    class SlowPerToken(FakeRuntime):
        def run(self, batch: Batch, outputs: Sequence[str]) -> dict[str, np.ndarray]:
            time.sleep(20e-6 * batch.padded_tokens)
            return super().run(batch, outputs)

    fake = SlowPerToken()

    async def main() -> None:
        batcher = Batcher(fake.run, BatcherOptions(max_queue_delay_s=0))
        try:
            cost = await batcher.calibrate(np.arange(5, 40), ["mean_layer1"], 128)
            best = cost.best_size(128)  # ~2; more where the machine is busy (sleep overshoots)
            assert best <= 8 and cost.b_s == pytest.approx(20e-6, rel=0.5)
            fake.batches.clear()
            first = await blocked_first_batch(fake, batcher)
            bulk = [leveled(100 + i, 128, level=2, caller="feed") for i in range(12)]
            await batcher.submit(bulk, wait=False)
            fake.gate.set()
            await asyncio.gather(first.future, *(b.future for b in bulk))
            assert max(len(b) for b in fake.batches[1:]) <= best < 32
        finally:
            fake.gate.set()
            await batcher.close()

    asyncio.run(main())


def test_a_text_past_its_queue_timeout_fails_deadline_exceeded() -> None:
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        late = leveled(600, 3, level=2, caller="feed", timeout_s=1e-6)
        fine = leveled(601, 3, level=2, caller="feed")
        await batcher.submit([late, fine], wait=False)
        await asyncio.sleep(0.001)  # past the 1 us timeout, whatever the clock's grain
        fake.gate.set()
        await asyncio.gather(first.future, fine.future)
        with pytest.raises(QueueTimeout, match="past its timeout"):
            await late.future
        assert all(600 not in b for b in fake.batches)

    run(body)


def test_close_fails_what_waits_when_the_batch_loop_has_died() -> None:
    """A loop task that ended (a bug, a cancel) must not leave close() spinning forever nor
    callers waiting on futures nothing will ever set."""
    async def body(fake: FakeRuntime, batcher: Batcher) -> None:
        first = await blocked_first_batch(fake, batcher)
        waiting = item(20, 3)
        await batcher.submit([waiting], wait=False)
        batcher._loop_task.cancel()
        fake.gate.set()
        await asyncio.wait_for(batcher.close(), 5)
        assert (await first.future) is not None  # the running batch still answers
        with pytest.raises(EngineUnavailable, match="the batcher stopped"):
            await waiting.future

    run(body)
