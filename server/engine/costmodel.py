"""What a batch costs on one model version's engine: `seconds = a + b x padded tokens`.

One form for every engine: the fake device sleeps by it (backends/fake.py), and each real version
measures it at warm-up (`measure`, through the same `run(Batch, outputs)` the batcher calls),
so the batcher sizes batches the same way whatever runs them. `a` is what a batch costs
whatever its size (kernel launches, copies, a synchronisation: ~2.4 ms on an H100), `b` what
each padded token adds. From them the batcher takes:
- `best_size(length)`: the smallest batch whose throughput is within `slack` of the most this
  engine can give at that length. On a GPU (large `a`) that is hundreds of texts; on a CPU,
  where `a` is small beside a text's own cost, one or two: bigger batches only make texts wait.
- `seconds(tokens)`: how long a batch will run, so a batch of bulk texts is cut to the
  `max_batch_duration` an interactive text may wait behind it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CostModel", "Point", "fit", "measure"]


@dataclass(frozen=True)
class Point:
    """One measured batch: `batch` texts padded to `tokens` ran in `seconds`."""

    batch: int
    tokens: int
    seconds: float

    @property
    def padded_tokens(self) -> int:
        return self.batch * self.tokens

    @property
    def texts_per_s(self) -> float:
        return self.batch / self.seconds


def fit(points: Sequence[Point]) -> tuple[float, float]:
    """(a, b) of `seconds = a + b x padded_tokens`, least squares on the relative error so a
    2 ms single-text batch counts as much as a 23 ms full one; neither is negative."""
    if len({p.padded_tokens for p in points}) < 2:  # one size cannot split a from b
        return float(np.mean([p.seconds for p in points])), 0.0
    x = np.array([[1.0, p.padded_tokens] for p in points]) / np.array(
        [[p.seconds] for p in points])
    y = np.ones(len(points))
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    a, b = float(a), float(b)
    if b <= 0:  # a flat cost: no per-token term is all the data supports
        return float(np.mean([p.seconds for p in points])), 0.0
    if a < 0:  # no fixed cost: the per-token term alone, fitted again
        b = float(np.mean([p.seconds / p.padded_tokens for p in points]))
        return 0.0, b
    return a, b


@dataclass(frozen=True)
class CostModel:
    a_s: float  # fixed seconds per batch
    b_s: float  # seconds per padded token
    points: tuple[Point, ...] = ()  # what it was fitted to (empty for a profile's own model)

    @classmethod
    def fitted(cls, points: Sequence[Point]) -> CostModel:
        a, b = fit(points)
        return cls(a, b, tuple(points))

    def seconds(self, padded_tokens: int) -> float:
        return self.a_s + self.b_s * padded_tokens

    def best_size(self, length: int, slack: float = 0.05) -> int:
        """Smallest batch of `length`-token texts within `slack` of the engine's best texts/s.

        Throughput n / (a + b n L) grows towards 1 / (b L); it is within `slack` of that once
        n >= (1 - slack) a / (slack b L)."""
        if self.a_s <= 0:
            return 1
        if self.b_s <= 0:
            return 1 << 30  # a flat cost: every text more is free
        return max(1, math.ceil((1 - slack) * self.a_s / (slack * self.b_s * max(length, 1))))

    def longest_batch(self, length: int, seconds: float) -> int:
        """Most texts of `length` tokens a batch may hold and still run within `seconds`
        (at least one: a single text always runs). Where the fixed cost alone takes half of
        `seconds` or more, the texts get half of it on top of the fixed cost: any batch pays
        that, so cutting one to a single text would cost most of the throughput and save a
        waiting text almost nothing (with no per-token cost, none at all)."""
        if self.b_s <= 0:
            return 1 << 30  # every size runs in a_s
        budget = max(seconds, self.a_s + seconds / 2)
        return max(1, int((budget - self.a_s) / (self.b_s * max(length, 1))))


# A warm-up that measures for longer than this stops adding larger batches.
MEASURE_BUDGET_S = 3.0
# ... as does one whose slowest batch took this many times its fastest: the per-token cost is
# then plain beside the fixed one. Each larger shape also holds memory in the session (its
# arena and memory pattern) for as long as the version serves, so no more are run than needed.
SPREAD = 4.0


def measure(run: Callable[[int, int], None], max_size: int, max_length: int,
            max_tokens: int, budget_s: float = MEASURE_BUDGET_S) -> CostModel:
    """Time `run(batch, length)` over a grid of shapes and fit the model.

    Each shape runs once unmeasured (an engine's first run of a shape compiles or allocates),
    then twice; the faster counts. The three cheapest shapes (one short text, one long text,
    four short texts) always run, so even a slow engine is fitted to distinct sizes; larger
    batches (4, 16, 64... up to `max_size`, at both lengths) follow until the slowest batch
    takes SPREAD times the fastest, or the cost they are predicted to add would overrun the
    budget. On a CPU the first three usually suffice; a GPU's fixed cost needs thousands of
    tokens before the per-token cost shows."""
    short, long = min(16, max_length), min(128, max_length)
    sizes = [n for n in (1, 4, 16, 64, 256) if n < max_size] + [max_size]
    first = [(1, short), (1, long), (min(4, max_size), short)]
    rest = [(n, length) for length in (short, long) for n in sizes
            if (n, length) not in first and n * length <= max_tokens]
    points: list[Point] = []
    spent = 0.0
    for size, length in dict.fromkeys(first + sorted(rest, key=lambda s: s[0] * s[1])):
        if len(points) >= len(first) and (
                _spread(points) >= SPREAD or spent + 3 * _guess(points, size * length) > budget_s):
            break
        best = math.inf
        for attempt in range(3):
            start = time.perf_counter()
            run(size, length)
            took = time.perf_counter() - start
            spent += took
            if attempt:
                best = min(best, took)
        points.append(Point(size, length, best))
    return CostModel.fitted(points)


def _spread(points: Sequence[Point]) -> float:
    """How much longer the slowest measured batch took than the fastest."""
    return max(p.seconds for p in points) / max(min(p.seconds for p in points), 1e-9)


def _guess(points: Sequence[Point], padded_tokens: int) -> float:
    """A shape's cost by the model fitted so far (the largest measured shape, scaled by its
    tokens, when the sizes measured so far do not tell a fixed cost from a per-token one)."""
    if len({p.padded_tokens for p in points}) >= 2:
        return CostModel.fitted(points).seconds(padded_tokens)
    largest = max(points, key=lambda p: p.padded_tokens)
    return largest.seconds * max(1.0, padded_tokens / largest.padded_tokens)
