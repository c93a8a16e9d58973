"""Which waiting texts form the next batch: priority levels, fair turns, cost-bounded size.

Bookkeeping only: no asyncio, no clock, no threads. The batcher (batcher.py) owns one
`Scheduler` per model version, calls it on the event loop and passes `now`, so every choice
here is a function of what waits and is tested by table (tests/unit/test_scheduler.py).

The rules (Triton's priority levels and queue policies, plus what Triton lacks):
- **Levels.** Every text waits in its request's level, 1 the highest. A batch takes texts of
  one level: the highest that has any, unless a lower level has been passed over for
  `max_skipped_batches` batches in a row while it waited; then it goes first. So a flood of
  interactive calls slows bulk feeds down but never stops them.
- **Fair turns.** Within a level, texts queue per caller (a stream, a connection) in arrival
  order, and callers take turns: the batch starts with the oldest text of the caller whose
  turn it is, then each caller in turn adds its waiting text closest in length to that first
  one (among its next `lookahead`), so two feeds share the engine evenly and a 1,000-text
  request does not hold a 1-text request of its level behind all of it. Within a round the
  offers closest in length go first. The starting caller moves to the back of the ring after
  each batch.
- **Size by cost.** A batch holds at most `max_batch_size` texts and `max_batch_tokens`
  padded tokens, and no more texts than the version's measured cost model says help
  throughput (`CostModel.best_size`). A batch of a level below 1 is also cut to what runs
  within `max_batch_duration`, because a level-1 text that arrives while it runs waits for it.
  One text always goes, however long.
- **Waiting.** The first text of a batch waits up to `max_queue_delay` for others to join
  unless its level already has enough for a full batch.
- **Admission by time.** Once the cost model is measured, a request is refused at once when
  the work already waiting at its level and above would take longer than `max_queue_wait` to
  run (or than the request's own queue timeout): under overload the excess is told to come
  back (RESOURCE_EXHAUSTED / 429) instead of queueing into timeouts, and what is admitted
  waits a bounded time. `max_queue_size` (texts) still bounds memory. Streams wait for room
  instead of being refused, so a feed is slowed, never failed.
- **Queue policy.** A text that waited past its request's timeout fails the request
  (REJECT: DEADLINE_EXCEEDED) or moves to the lowest level with no timeout (DELAY). Timeouts are
  checked when a batch is formed, so a request fails at most one batch late. Cancelled
  requests' texts are dropped whenever they are met.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .costmodel import CostModel

if TYPE_CHECKING:
    from .batcher import WorkItem

__all__ = ["BatcherOptions", "LevelPolicy", "Scheduler"]

# One waiting text: (its length, its request, its index in the request).
Text = tuple[int, "WorkItem", int]


@dataclass(frozen=True)
class LevelPolicy:
    """Triton's ModelQueuePolicy for one level."""

    timeout_s: float = 0.0  # 0: texts may wait as long as their caller does
    delay: bool = False  # timeout_action DELAY: move to the lowest level instead of failing
    allow_override: bool = False  # a request's own timeout may lengthen timeout_s
    max_queue_size: int = 0  # texts; 0: only the model's max_queue_size


@dataclass(frozen=True)
class BatcherOptions:
    max_batch_size: int = 32
    max_batch_tokens: int = 32 * 512
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 2048  # texts, all levels together
    max_queue_wait_s: float = 2.0  # predicted wait past which a request is refused; 0: none
    instances: int = 1
    lookahead: int = 256  # waiting texts of one caller a batch may pick from, by length
    levels: int = 2
    default_level: int = 2  # stream messages and bulk requests that name no level
    policies: tuple[LevelPolicy, ...] = ()  # per level from 1; missing ones: LevelPolicy()
    max_batch_duration_s: float = 0.05
    max_skipped_batches: int = 4
    throughput_slack: float = 0.05  # best_size: within 5 % of the best texts/s

    def policy(self, level: int) -> LevelPolicy:
        return self.policies[level - 1] if level <= len(self.policies) else LevelPolicy()


@dataclass
class _Level:
    callers: dict[Hashable, deque[Text]] = field(default_factory=dict)  # ring: first's turn
    count: int = 0  # texts waiting, cancelled ones included until they are met
    tokens: int = 0  # their tokens
    skipped: int = 0  # batches in a row that went elsewhere while this level waited
    next_deadline: float = math.inf


class Scheduler:
    """The waiting texts of one model version, by level and caller."""

    def __init__(self, options: BatcherOptions, cost: CostModel | None = None) -> None:
        self.options = options
        self.cost = cost  # set once the version's warm-up measured it
        self.slowdown = 1.0  # recent batches' real time over the cost model's (`observe`)
        self._levels = [_Level() for _ in range(max(1, options.levels))]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def waiting(self, level: int) -> int:
        return self._levels[level - 1].count

    def level_of(self, item: WorkItem) -> int:
        """The item's level, within the levels that exist."""
        return min(max(item.priority or self.options.default_level, 1), len(self._levels))

    # -- admission ----------------------------------------------------------------------

    def room(self, items: Sequence[WorkItem]) -> bool:
        return self.refusal(items) is None

    def refusal(self, items: Sequence[WorkItem]) -> str | None:
        """Why `items` may not queue now (None: they may). Over the model's or a level's text
        limit, or (cost model measured) when the work waiting ahead of them would take longer
        than `max_queue_wait` or their own queue timeout. An empty queue (or level) admits any
        request, however large, so none waits forever."""
        count = sum(len(item.encoded) for item in items)
        if self._count and self._count + count > self.options.max_queue_size:
            return f"queue full ({self._count} texts waiting)"
        per_level: dict[int, int] = {}
        for item in items:
            level = self.level_of(item)
            per_level[level] = per_level.get(level, 0) + len(item.encoded)
        for level, added in per_level.items():
            limit = self.options.policy(level).max_queue_size
            waiting = self._levels[level - 1].count
            if limit and waiting and waiting + added > limit:
                return f"queue full ({waiting} texts waiting at priority level {level})"
        if self.cost is None:
            return None
        for item in items:
            level = self.level_of(item)
            bound = _timeout(self.options.policy(level), item.timeout_s)
            if self.options.policy(level).delay:  # a timeout that moves texts never fails them
                bound = 0.0
            limits = [x for x in (self.options.max_queue_wait_s, bound) if x > 0]
            if not limits:
                continue
            ahead = self.backlog_s(level, _key(item), len(item.encoded))
            if ahead > min(limits):
                return (f"the texts that would run before this request's at priority level "
                        f"{level} need ~{ahead:.1f} s, over the {min(limits):.1f} s a text may "
                        "wait")
        return None

    def backlog_s(self, level: int, caller: Hashable = None, adding: int = 0) -> float:
        """Predicted seconds before the last of `adding` new texts of `caller` at `level`
        starts: every text waiting at the levels above, and at its own level what fair turns
        run first: its caller's queue, and a turn of each other waiting caller per turn of
        its own. By the cost model, in batches as large as `_cap` allows at the
        level's mean length, scaled by how much slower than predicted recent batches ran
        (`observe`), spread over the version's instances. 0 before the cost model exists."""
        if self.cost is None:
            return 0.0
        own = self._levels[level - 1]
        own_mean = max(1, math.ceil(own.tokens / own.count)) if own.count > 0 else 1
        # A lower level is passed over for at most max_skipped_batches batches in a row
        # (`take`): the levels above count for that many batches per batch of its own.
        own_batches = math.ceil((own.count + max(adding, 1)) / self._cap(level, own_mean))
        seconds = 0.0
        for number, lv in enumerate(self._levels[:level], start=1):
            if lv.count <= 0:
                continue
            texts = lv.count
            mean = max(1, math.ceil(lv.tokens / lv.count))
            size = self._cap(number, mean)
            if number < level:
                texts = min(texts, self.options.max_skipped_batches * own_batches * size)
            if number == level and caller is not None and adding:
                # Fair turns: before the caller's last new text, each other caller waiting
                # at this level runs one text per turn the caller still has to take. One
                # with fewer texts waiting now is counted as staying that long all the
                # same (callers keep sending under load: counting only what waits now let
                # a deep caller's texts wait many times the limit); the caller's own new
                # texts beyond its first are its own size, not waiting.
                mine = len(lv.callers.get(caller, ()))
                texts = mine + sum(min(max(len(queue), mine + 1), mine + adding)
                                   for key, queue in lv.callers.items() if key != caller)
            seconds += math.ceil(texts / size) * self.cost.a_s + self.cost.b_s * mean * texts
        return seconds * self.slowdown / max(1, self.options.instances)

    def observe(self, predicted_s: float, took_s: float) -> None:
        """A batch the cost model priced at `predicted_s` held the engine for `took_s` (the
        batcher measures it from batch start to batch start while a backlog waits): a moving
        ratio of the two corrects the wait predictions for what warm-up could not see
        (threads and callers competing for the cores under load)."""
        if predicted_s <= 0 or took_s <= 0:
            return
        ratio = min(max(took_s / predicted_s, 0.5), 20.0)
        self.slowdown += 0.1 * (ratio - self.slowdown)

    def add(self, item: WorkItem, now: float) -> None:
        """Queue all of the item's texts at its level, behind its caller's earlier texts."""
        level = self.level_of(item)
        item.enqueued_at = now
        timeout = _timeout(self.options.policy(level), item.timeout_s)
        item.deadline = now + timeout if timeout else math.inf
        self._put(level, [(length, item, index)
                          for index, length in enumerate(item.encoded.lengths)])

    def _put(self, level: int, texts: Sequence[Text]) -> None:
        if not texts:
            return
        lv = self._levels[level - 1]
        key = _key(texts[0][1])
        queue = lv.callers.get(key)
        if queue is None:
            queue = lv.callers[key] = deque()
        queue.extend(texts)
        lv.count += len(texts)
        lv.tokens += sum(text[0] for text in texts)
        self._count += len(texts)
        lv.next_deadline = min(lv.next_deadline, texts[0][1].deadline)

    # -- timeouts -----------------------------------------------------------------------

    def expire(self, now: float) -> list[WorkItem]:
        """Apply the queue policy to texts past their deadline; returns the requests that
        fail (REJECT). DELAY moves the texts to the lowest level, with no deadline."""
        failed: dict[int, WorkItem] = {}
        lowest = len(self._levels)
        for number, lv in enumerate(self._levels, start=1):
            if now < lv.next_deadline:
                continue
            lv.next_deadline = math.inf
            moved: list[Text] = []
            delayed: set[int] = set()  # requests moving down: all of their texts go
            for key, queue in list(lv.callers.items()):
                kept: deque[Text] = deque()
                for text in queue:
                    item = text[1]
                    if item.future.done():
                        continue
                    if id(item) in delayed:
                        moved.append(text)
                    elif item.deadline > now:
                        kept.append(text)
                        lv.next_deadline = min(lv.next_deadline, item.deadline)
                    elif self.options.policy(number).delay and number != lowest:
                        item.deadline = math.inf
                        delayed.add(id(item))
                        moved.append(text)
                    else:
                        failed[id(item)] = item
                self._recount(lv, len(queue) - len(kept),
                              _tokens(queue) - _tokens(kept))
                if kept:
                    lv.callers[key] = kept
                else:
                    del lv.callers[key]
            for _, group in itertools.groupby(moved, key=lambda text: id(text[1])):
                self._put(lowest, list(group))
        return list(failed.values())

    def _recount(self, lv: _Level, removed: int, tokens: int) -> None:
        lv.count -= removed
        lv.tokens -= tokens
        self._count -= removed

    # -- batches ------------------------------------------------------------------------

    def ready_in(self, now: float) -> float:
        """Seconds until the next batch should be formed: 0 now, inf when nothing waits."""
        number = self._choose()
        if number is None:
            return math.inf
        lv = self._levels[number - 1]
        head = next(iter(lv.callers.values()))[0]
        if lv.count >= self._cap(number, head[0]):
            return 0.0
        return max(0.0, head[1].enqueued_at + self.options.max_queue_delay_s - now)

    def take(self) -> list[Text]:
        """The next batch, in the order its texts were chosen; [] when nothing waits."""
        number = self._choose()
        if number is None:
            return []
        for other, lv in enumerate(self._levels, start=1):
            lv.skipped = 0 if other == number or not lv.count else lv.skipped + 1
        return self._form(number)

    def _choose(self) -> int | None:
        """The level of the next batch (dropping cancelled texts at the callers' heads)."""
        live = [number for number, lv in enumerate(self._levels, start=1)
                if self._prune(lv)]
        if not live:
            return None
        limit = self.options.max_skipped_batches
        starving = [n for n in live[1:] if self._levels[n - 1].skipped >= limit]
        return starving[0] if starving else live[0]

    def _prune(self, lv: _Level) -> bool:
        """Drop cancelled texts at each caller's head and empty callers; True if any wait."""
        for key in list(lv.callers):
            queue = lv.callers[key]
            while queue and queue[0][1].future.done():
                self._recount(lv, 1, queue.popleft()[0])
            if not queue:
                del lv.callers[key]
        return bool(lv.callers)

    def _cap(self, level: int, longest: int) -> int:
        """Most texts a batch of this level may hold when its longest text has `longest`."""
        options = self.options
        cap = min(options.max_batch_size, max(1, options.max_batch_tokens // max(longest, 1)))
        if self.cost is not None:
            cap = min(cap, self.cost.best_size(longest, options.throughput_slack))
            if level > 1:
                cap = min(cap, self.cost.longest_batch(longest, options.max_batch_duration_s))
        return max(1, cap)

    def _form(self, number: int) -> list[Text]:
        lv = self._levels[number - 1]
        keys = list(lv.callers)
        head = lv.callers[keys[0]][0]
        target, longest = head[0], head[0]
        chosen: list[Text] = [head]
        taken: set[int] = {id(head)}
        # Each caller's candidates: its next `lookahead` live texts, closest in length first.
        offers: dict[Hashable, list[Text]] = {}
        for key in keys:
            window = itertools.islice(lv.callers[key], 0, self.options.lookahead)
            live = [t for t in window if id(t) not in taken and not t[1].future.done()]
            live.sort(key=lambda t: abs(t[0] - target))
            offers[key] = live[::-1]  # pop() takes the closest
        active = [key for key in keys if offers[key]]
        had_turn = keys[0]  # the head was its text of the first round
        cap = self._cap(number, longest)
        # Callers near the front of the ring go first: among the first 2 x cap callers the
        # closest offers, then the next 2 x cap... So a caller's turn comes within a bounded
        # number of batches however its lengths compare (a short text among long ones is not
        # passed over until it is the head), and padding stays low within each group.
        position = {key: i for i, key in enumerate(keys)}
        window = max(2 * cap, 2)
        while active and len(chosen) < cap:
            # One round: each caller adds one text, the closest offers first, so a round
            # cut short by the cap still keeps padding low.
            if len(active) > 1:
                active.sort(key=lambda key: (position[key] // window,
                                             abs(offers[key][-1][0] - target)))
            for key in [key for key in active if key != had_turn]:
                offer = offers[key]
                length = offer[-1][0]
                if length > longest:  # a longer text lowers the cap for the whole batch
                    longer_cap = self._cap(number, length)
                    if len(chosen) >= longer_cap:
                        active.remove(key)  # its closest does not fit: the others' may
                        continue
                    longest, cap = length, longer_cap
                text = offer.pop()
                chosen.append(text)
                taken.add(id(text))
                if not offer:
                    active.remove(key)
                if len(chosen) >= cap:
                    break
            had_turn = None
        self._remove(lv, keys, taken)
        # Every caller served had its turn: behind those not served, the head last.
        served = dict.fromkeys(_key(text[1]) for text in chosen)
        first = keys[0]
        for key in [*[k for k in served if k != first], first]:
            if key in lv.callers:
                lv.callers[key] = lv.callers.pop(key)
        return chosen

    def _remove(self, lv: _Level, keys: Iterable[Hashable], taken: set[int]) -> None:
        """Take the chosen texts out of their callers' queues (only the windows were read)."""
        window = self.options.lookahead
        for key in keys:
            queue = lv.callers[key]
            head = [queue.popleft() for _ in range(min(window, len(queue)))]
            kept = [t for t in head if id(t) not in taken and not t[1].future.done()]
            queue.extendleft(reversed(kept))
            self._recount(lv, len(head) - len(kept), _tokens(head) - _tokens(kept))
            if not queue:
                del lv.callers[key]


def _key(item: WorkItem) -> Hashable:
    """The caller whose turn an item's texts take: its stream or connection, else itself."""
    return item.caller if item.caller is not None else id(item)


def _tokens(texts: Iterable[Text]) -> int:
    return sum(text[0] for text in texts)


def _timeout(policy: LevelPolicy, requested: float) -> float:
    """A request's timeout under its level's policy: the request's own replaces the default
    when the policy allows it, and otherwise may only shorten it. 0: none."""
    if requested and (policy.allow_override or not policy.timeout_s
                      or requested < policy.timeout_s):
        return requested
    return policy.timeout_s
