"""The scheduler's choices by table: which waiting texts form the next batch, given levels,
callers, ages, lengths and the cost model. No event loop, no clock: `now` is passed in."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np
import pytest
from bertstream.server.engine.batch import Encoded
from bertstream.server.engine.batcher import WorkItem
from bertstream.server.engine.costmodel import CostModel, Point, fit, measure
from bertstream.server.engine.scheduler import BatcherOptions, LevelPolicy, Scheduler


class _Future:
    """The part of an asyncio future the scheduler reads: whether it is done."""

    def __init__(self) -> None:
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled


@dataclass(frozen=True)
class Req:
    """A request row of a table: a name, its texts' lengths, level, caller, arrival, timeout."""

    name: str
    lengths: tuple[int, ...]
    level: int = 2
    caller: str | None = None
    at: float = 0.0
    timeout: float = 0.0


def make(req: Req) -> WorkItem:
    lengths = list(req.lengths)
    ids = np.ones(sum(lengths), dtype=np.int64)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    encoded = Encoded(ids, lengths, starts, [0] * len(lengths))
    item = WorkItem(encoded, frozenset({"x"}), _Future(),  # type: ignore[arg-type]
                    req.level, req.caller, req.timeout)
    item.name = req.name  # type: ignore[attr-defined]
    return item


def queue(reqs: list[Req], **options: object) -> tuple[Scheduler, dict[str, WorkItem]]:
    scheduler = Scheduler(BatcherOptions(**options))  # type: ignore[arg-type]
    items = {}
    for req in reqs:
        items[req.name] = make(req)
        scheduler.add(items[req.name], req.at)
    return scheduler, items


def names(batch: list) -> list[str]:  # type: ignore[type-arg]
    """A batch as `name.index` per text, in the order the scheduler chose them."""
    return [f"{text[1].name}.{text[2]}" for text in batch]


def batches(scheduler: Scheduler, count: int) -> list[list[str]]:
    return [names(scheduler.take()) for _ in range(count)]


# A GPU-like engine: 2.4 ms a batch + 0.5 us a token (best size in the hundreds), and a
# CPU-like one: 0.2 ms + 0.3 ms a token, where one text a batch is within 5 % of the best.
GPU = CostModel(2.4e-3, 0.5e-6)
CPU = CostModel(0.2e-3, 0.3e-3)

TABLE = [
    pytest.param(
        [Req("bulk", (10,) * 500, level=2, caller="feed"), Req("ui", (10,), level=1, at=1.0)],
        {}, [["ui.0"]], id="a level-1 text behind 500 level-2 texts goes first"),
    pytest.param(
        [Req("a", (10,) * 4, caller="A"), Req("b", (10,) * 4, caller="B", at=0.5)],
        {"max_batch_size": 4}, [["a.0", "b.0", "a.1", "b.1"], ["b.2", "a.2", "b.3", "a.3"]],
        id="two callers of one level take turns within and across batches"),
    pytest.param(
        [Req("big", (10,) * 1000, caller="A"), Req("one", (10,), caller="B", at=0.5)],
        {"max_batch_size": 8}, [["big.0", "one.0", "big.1", "big.2", "big.3", "big.4",
                                 "big.5", "big.6"]],
        id="a 1-text request does not wait for a 1,000-text one of its level"),
    pytest.param(
        [Req("a", (10, 100, 12, 98, 11, 99), caller="A")],
        {"max_batch_size": 3}, [["a.0", "a.4", "a.2"], ["a.1", "a.5", "a.3"]],
        id="one caller: the oldest text and the closest lengths in its window"),
    pytest.param(
        [Req("x", (10,), caller="X"), Req("y", (200,), caller="Y"), Req("z", (12,), caller="Z")],
        {"max_batch_size": 2}, [["x.0", "z.0"], ["y.0"]],
        id="within a round the closest offers go first"),
    pytest.param(
        [Req("a", (50,) * 8, caller="A")],
        {"max_batch_size": 32, "max_batch_tokens": 160}, [["a.0", "a.1", "a.2"]],
        id="the token budget caps a batch"),
    pytest.param(
        [Req("a", (400,), caller="A")],
        {"max_batch_size": 32, "max_batch_tokens": 100}, [["a.0"]],
        id="a text over the token budget still runs alone"),
]


@pytest.mark.parametrize(("reqs", "options", "expected"), TABLE)
def test_next_batches(reqs: list[Req], options: dict[str, object],
                      expected: list[list[str]]) -> None:
    scheduler, _ = queue(reqs, **options)
    assert batches(scheduler, len(expected)) == expected


COST_TABLE = [
    pytest.param(GPU, 2, 128, 256, id="GPU, bulk: as large as max_batch_size allows"),
    pytest.param(CPU, 2, 128, 1, id="CPU, bulk: one text (bigger batches only add waiting)"),
    pytest.param(CostModel(2e-3, 1e-5), 1, 100, 38,
                 id="level 1: the best size (38)"),
    pytest.param(CostModel(2e-3, 1e-5), 2, 100, 38,
                 id="level 2: the best size (38) is under the duration cap (48)"),
    pytest.param(CostModel(20e-3, 1e-5), 2, 100, 30,
                 id="level 2: the duration cap (30) cuts the best size (380)"),
    pytest.param(CostModel(20e-3, 1e-5), 1, 100, 256,
                 id="level 1 is not cut by the duration cap, only by max_batch_size"),
]


@pytest.mark.parametrize(("cost", "level", "length", "size"), COST_TABLE)
def test_batch_size_by_cost_model(cost: CostModel, level: int, length: int, size: int) -> None:
    scheduler, _ = queue([Req("r", (length,) * 600, level=level, caller="A")],
                         max_batch_size=256, max_batch_tokens=256 * 128,
                         max_batch_duration_s=0.05, lookahead=1024, max_queue_size=4096)
    scheduler.cost = cost
    assert len(scheduler.take()) == size


def test_a_caller_whose_lengths_differ_is_not_passed_over_until_it_is_the_head() -> None:
    """20 callers of long texts, then one with a short text, batches of 4: callers near the
    front of the ring go first and every caller served moves behind those not served, so
    the short text's turn comes within about 2 x 20 / 4 batches, not after all 20 heads."""
    reqs = [Req(f"c{i}", (100,) * 5, caller=f"C{i}", at=i * 0.001) for i in range(20)]
    scheduler, _ = queue([*reqs, Req("short", (5,), caller="S", at=1.0)], max_batch_size=4)
    order = [names(scheduler.take()) for _ in range(30)]
    taken = next(i for i, batch in enumerate(order, start=1) if "short.0" in batch)
    assert taken <= 11, taken


def test_no_level_starves() -> None:
    """Level 1 always has texts; level 2 still gets one batch in max_skipped_batches + 1."""
    scheduler, _ = queue([Req("ui", (10,) * 100, level=1, caller="U"),
                          Req("bulk", (10,) * 100, level=2, caller="F")],
                         max_batch_size=1, max_skipped_batches=3)
    levels = [scheduler.take()[0][1].name for _ in range(12)]
    assert levels == ["ui", "ui", "ui", "bulk"] * 3


def test_an_empty_higher_level_does_not_count_as_skipping() -> None:
    scheduler, _ = queue([Req("bulk", (10,) * 10, level=2, caller="F")],
                             max_batch_size=1, max_skipped_batches=2)
    assert batches(scheduler, 3) == [["bulk.0"], ["bulk.1"], ["bulk.2"]]
    scheduler.add(make(Req("ui", (10,) * 5, level=1, caller="U")), 1.0)
    # Level 2 was never passed over while waiting before level 1 arrived.
    assert [b[0].split(".")[0] for b in batches(scheduler, 4)] == ["ui", "ui", "bulk", "ui"]


def test_cancelled_requests_are_dropped_wherever_they_wait() -> None:
    scheduler, items = queue([Req("a", (10,) * 3, caller="A"), Req("b", (10,) * 3, caller="B"),
                              Req("c", (10,), level=1, caller="C")], max_batch_size=8)
    items["c"].future.cancelled = True  # type: ignore[attr-defined]
    items["a"].future.cancelled = True  # type: ignore[attr-defined]
    assert batches(scheduler, 2) == [["b.0", "b.1", "b.2"], []]
    assert len(scheduler) == 0


@pytest.mark.parametrize(("policy", "timeout", "now", "expected"), [
    pytest.param(LevelPolicy(timeout_s=1.0), 0.0, 0.9, [], id="policy timeout not reached"),
    pytest.param(LevelPolicy(timeout_s=1.0), 0.0, 1.1, ["old"], id="policy timeout: REJECT"),
    pytest.param(LevelPolicy(timeout_s=1.0), 0.5, 0.6, ["old"],
                 id="a request's own timeout shortens the policy's"),
    pytest.param(LevelPolicy(timeout_s=1.0), 5.0, 1.1, ["old"],
                 id="without allow_timeout_override it cannot lengthen it"),
    pytest.param(LevelPolicy(timeout_s=1.0, allow_override=True), 5.0, 1.1, [],
                 id="with allow_timeout_override it can"),
    pytest.param(LevelPolicy(), 0.5, 0.6, ["old"], id="a request's timeout with no policy"),
])
def test_queue_timeouts(policy: LevelPolicy, timeout: float, now: float,
                        expected: list[str]) -> None:
    scheduler, _ = queue([Req("old", (10, 10), level=1, caller="A", timeout=timeout),
                          Req("new", (10,), level=1, caller="B", at=0.5)],
                         policies=(policy,))
    assert sorted(item.name for item in scheduler.expire(now)) == expected  # type: ignore[attr-defined]
    left = sorted({t[1].name for t in scheduler.take()})
    assert "old" not in left if expected else "old" in left


def test_delay_moves_timed_out_texts_to_the_lowest_level() -> None:
    scheduler, _ = queue([Req("late", (10,), level=1, caller="A"),
                          Req("bulk", (10,), level=3, caller="F", at=0.1)],
                         levels=3, policies=(LevelPolicy(timeout_s=1.0, delay=True),),
                         max_batch_size=4)
    assert scheduler.expire(2.0) == []
    assert scheduler.waiting(1) == 0 and scheduler.waiting(3) == 2
    assert batches(scheduler, 1) == [["bulk.0", "late.0"]]


def test_room_checks_the_model_limit_and_each_level_limit() -> None:
    scheduler, _ = queue([Req("a", (10,) * 3, level=1), Req("b", (10,) * 3, level=2)],
                         max_queue_size=10, policies=(LevelPolicy(max_queue_size=4),))
    assert not scheduler.room([make(Req("c", (10,) * 2, level=1))])  # level 1: 3 + 2 > 4
    assert scheduler.room([make(Req("c", (10,) * 2, level=2))])  # 8 of 10
    assert not scheduler.room([make(Req("c", (10,) * 5, level=2))])  # 11 > 10


def test_an_empty_queue_admits_any_request() -> None:
    scheduler = Scheduler(BatcherOptions(max_queue_size=2))
    assert scheduler.room([make(Req("big", (10,) * 50))])


def test_delay_moves_every_text_of_a_timed_out_request() -> None:
    scheduler, _ = queue([Req("late", (10, 10, 10), level=1, caller="A")], levels=2,
                         policies=(LevelPolicy(timeout_s=1.0, delay=True),))
    assert scheduler.expire(2.0) == []
    assert scheduler.waiting(1) == 0 and scheduler.waiting(2) == 3


def test_admission_by_predicted_wait() -> None:
    """With a cost model, a request is refused once what would run before its texts (all of
    the levels above; at its own level its caller's queue and as many turns of each other
    caller) would take longer than max_queue_wait: a caller with a deep queue is refused while
    a light one still gets in, and level 2 waits for all of level 1."""
    # 10 ms a batch + 1 ms a token; 1 text a batch at most: each 10-token text costs 20 ms.
    scheduler, _ = queue([Req("heavy", (10,) * 25, level=1, caller="U"),
                          Req("light", (10,) * 2, level=1, caller="V"),
                          Req("feed", (10,) * 40, level=2, caller="F")],
                         max_queue_wait_s=0.5, max_batch_size=1)
    scheduler.cost = CostModel(0.010, 0.001)
    assert scheduler.backlog_s(1) == pytest.approx(27 * 0.020)
    assert scheduler.backlog_s(1, "W", 1) == pytest.approx(2 * 0.020)  # one turn of each
    assert scheduler.room([make(Req("new", (10,), level=1, caller="W"))])
    assert scheduler.room([make(Req("light2", (10,) * 3, level=1, caller="V"))])  # 2 + 5
    refusal = scheduler.refusal([make(Req("more", (10,), level=1, caller="U"))])  # 25 + 2
    assert refusal is not None and "priority level 1" in refusal and "0.5 s" in refusal
    assert not scheduler.room([make(Req("bulk", (10,), level=2, caller="G"))])  # 27 above
    while scheduler.backlog_s(1, "U", 1) > 0.5:  # batches drain the level: room again
        scheduler.take()
    assert scheduler.room([make(Req("more", (10,), level=1, caller="U"))])


def test_a_deep_caller_waits_a_turn_of_every_other_caller_per_text() -> None:
    """Under load light callers keep sending: a caller with 10 texts waiting beside 5 callers
    of one text each waits ~11 rounds of all of them, not for the 5 texts queued now."""
    reqs = [Req(f"l{i}", (10,), level=1, caller=f"L{i}") for i in range(5)]
    scheduler, _ = queue([Req("deep", (10,) * 10, level=1, caller="D"), *reqs],
                         max_queue_wait_s=0.5, max_batch_size=1)
    scheduler.cost = CostModel(0.010, 0.001)  # 20 ms a text
    assert scheduler.backlog_s(1, "D", 1) == pytest.approx((10 + 5 * 11) * 0.020)
    assert not scheduler.room([make(Req("more", (10,), level=1, caller="D"))])
    assert scheduler.room([make(Req("light", (10,) * 4, level=1, caller="N"))])  # 5 ahead


def test_a_flood_above_counts_only_the_batches_it_may_take_before_a_lower_level() -> None:
    """Level 1 holds 100 texts; a level-2 text waits for at most max_skipped_batches level-1
    batches per batch of its own (the scheduler then gives level 2 a turn), so it is not
    locked out of admission while level 1 stays full."""
    scheduler, _ = queue([Req("ui", (10,) * 100, level=1, caller="U")],
                         max_queue_wait_s=0.5, max_batch_size=1, max_skipped_batches=4)
    scheduler.cost = CostModel(0.010, 0.001)  # 20 ms a text
    assert scheduler.backlog_s(1) == pytest.approx(2.0)
    assert scheduler.backlog_s(2, "F", 1) == pytest.approx(4 * 0.020)
    assert scheduler.room([make(Req("bulk", (10,), level=2, caller="F"))])


def test_slow_batches_scale_the_prediction() -> None:
    scheduler, _ = queue([Req("a", (10,) * 10, level=1, caller="A")], max_batch_size=1)
    scheduler.cost = CostModel(0.010, 0.001)
    assert scheduler.backlog_s(1) == pytest.approx(0.2)
    for _ in range(100):  # batches run 3x what warm-up measured (cores shared under load)
        scheduler.observe(0.020, 0.060)
    assert scheduler.backlog_s(1) == pytest.approx(0.6, rel=0.01)
    for _ in range(100):
        scheduler.observe(0.020, 0.020)
    assert scheduler.backlog_s(1) == pytest.approx(0.2, rel=0.01)


def test_a_request_s_own_timeout_refuses_it_at_once_when_the_queue_cannot_meet_it() -> None:
    scheduler, _ = queue([Req("a", (10,) * 10, level=1, caller="A")],
                         max_queue_wait_s=60.0, max_batch_size=1)
    scheduler.cost = CostModel(0.010, 0.001)  # 0.2 s ahead of caller A's next text
    assert not scheduler.room([make(Req("hurry", (10,), level=1, caller="A", timeout=0.1))])
    assert scheduler.room([make(Req("calm", (10,), level=1, caller="A", timeout=0.5))])
    assert scheduler.room([make(Req("none", (10,), level=1, caller="A"))])


def test_no_time_limit_before_the_cost_model_or_when_turned_off() -> None:
    scheduler, _ = queue([Req("a", (100,) * 100, level=1, caller="A")], max_queue_wait_s=0.001)
    assert scheduler.room([make(Req("b", (10,), level=1))])  # not measured yet
    scheduler.cost = CostModel(0.010, 0.001)
    assert not scheduler.room([make(Req("b", (10,), level=1))])
    off, _ = queue([Req("a", (100,) * 100, level=1, caller="A")], max_queue_wait_s=0.0)
    off.cost = CostModel(0.010, 0.001)
    assert off.room([make(Req("b", (10,), level=1))])


def test_waiting_tokens_follow_every_way_texts_leave() -> None:
    """backlog_s reads a running count of tokens: batches, cancellations and timeouts must all
    take theirs out, or the server would refuse calls forever after one burst."""
    scheduler, items = queue([Req("a", (10, 20, 30), level=1, caller="A"),
                              Req("b", (40,), level=1, caller="B", timeout=1.0),
                              Req("c", (50, 60), level=1, caller="C")], max_batch_size=1)
    scheduler.cost = CostModel(0.0, 0.001)
    assert scheduler.backlog_s(1) == pytest.approx(0.210)
    scheduler.take()
    assert scheduler.backlog_s(1) == pytest.approx(0.200)
    assert scheduler.expire(5.0) == [items["b"]]
    assert scheduler.backlog_s(1) == pytest.approx(0.160)
    items["c"].future.cancelled = True  # type: ignore[attr-defined]
    while scheduler.take():
        pass
    assert len(scheduler) == 0 and scheduler.backlog_s(1) == 0.0


def test_ready_in_waits_for_company_unless_the_level_can_fill_a_batch() -> None:
    scheduler, _ = queue([Req("a", (10,), caller="A", at=1.0)],
                         max_queue_delay_s=0.01, max_batch_size=2)
    assert scheduler.ready_in(1.004) == pytest.approx(0.006)
    scheduler.add(make(Req("b", (10,), caller="B")), 1.005)
    assert scheduler.ready_in(1.005) == 0
    assert Scheduler(BatcherOptions()).ready_in(0.0) == math.inf


def test_levels_out_of_range_are_clamped() -> None:
    scheduler = Scheduler(BatcherOptions(levels=2, default_level=2))
    assert scheduler.level_of(make(Req("a", (1,), level=0))) == 2
    assert scheduler.level_of(make(Req("a", (1,), level=9))) == 2


# -- the cost model ------------------------------------------------------------------------

def test_fit_recovers_a_linear_cost() -> None:
    points = [Point(n, t, 2e-3 + 0.5e-6 * n * t) for n, t in
              [(1, 16), (4, 16), (16, 128), (64, 128)]]
    a, b = fit(points)
    assert a == pytest.approx(2e-3, rel=1e-6) and b == pytest.approx(0.5e-6, rel=1e-6)


def test_fit_never_goes_negative() -> None:
    # Slower per token for bigger batches than a straight line allows (a CPU's caches): the
    # fixed cost would come out negative; the model keeps a = 0 and refits b.
    points = [Point(1, 100, 0.010), Point(4, 100, 0.060), Point(16, 100, 0.300)]
    a, b = fit(points)
    assert a == 0 and b > 0
    assert CostModel(a, b).best_size(100) == 1


def test_best_size_and_longest_batch() -> None:
    assert GPU.best_size(128) >= 256
    assert CPU.best_size(128) == 1
    cost = CostModel(2e-3, 1e-5)
    n = cost.best_size(100)
    best = 1 / (cost.b_s * 100)
    assert n / cost.seconds(n * 100) >= 0.95 * best * (1 - 1e-9)
    assert (n - 1) / cost.seconds((n - 1) * 100) < 0.95 * best
    assert cost.longest_batch(100, 0.05) == 48
    assert cost.longest_batch(100, 0.001) == 1  # one text always runs
    slow = CostModel(0.057, 1e-5)  # a fixed cost over the 50 ms duration budget
    assert slow.longest_batch(100, 0.05) == 25  # the texts get half the budget on top of it
    assert CostModel(0.057, 0.0).longest_batch(100, 0.05) == 1 << 30  # size costs nothing


def test_measure_recovers_the_engine_it_times() -> None:
    """`measure` through a fake engine that sleeps a known cost finds that cost."""
    import time

    def run(size: int, length: int) -> None:
        time.sleep(5e-3 + 2e-6 * size * length)

    cost = measure(run, max_size=64, max_length=128, max_tokens=64 * 128, budget_s=2.0)
    assert cost.a_s == pytest.approx(5e-3, abs=2.5e-3)  # sleep overshoots on a busy machine
    assert cost.b_s == pytest.approx(2e-6, rel=0.4)
    assert {p.tokens for p in cost.points} == {16, 128}


def test_items_need_a_loop_only_for_their_future() -> None:
    """WorkItem's scheduling fields default so old callers keep working."""
    loop = asyncio.new_event_loop()
    try:
        item = WorkItem(make(Req("a", (3,))).encoded, frozenset(), loop.create_future())
        assert (item.priority, item.caller, item.timeout_s) == (0, None, 0.0)
    finally:
        loop.close()


def test_a_slow_flat_engine_is_still_fitted_to_distinct_sizes() -> None:
    """An engine whose every batch costs 30 ms whatever its size (a slow fake device): past
    the budget the three cheapest shapes still run, and the fit finds no per-token cost, so
    batches are as large as the other limits allow (one point alone would read as a huge
    per-token cost and cut every batch to one text)."""
    import time

    cost = measure(lambda size, length: time.sleep(0.03), max_size=32, max_length=64,
                   max_tokens=32 * 64, budget_s=0.1)
    assert len({p.padded_tokens for p in cost.points}) >= 2
    assert cost.b_s < 1e-5 and cost.best_size(64) >= 32
