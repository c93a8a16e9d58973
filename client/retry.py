"""The bulk feed's retry policy, as two pure functions: nothing here sleeps, draws random
numbers or touches the network, so the tests are tables.

- `decide`: a stream failed (or one of its messages came back with a retryable error): open
  the next one after a backoff, or give up on the feed. From the status code, whether the
  stream had answered before it failed, how many streams in a row failed before answering, and
  how long the feed has gone without writing an answer.
- `item_step`: what one text of a failed message becomes: sent again (batched, or alone in
  case it is the text at fault), answered with an error line once its attempts run out, or the
  end of the feed. This is the one place item attempts are counted.
- `aged_out`: the stream was ended by the server ageing its connection (grpc core's
  max_connection_age, server/api/grpc_connections.py): housekeeping, not a failure, when the
  stream was answering. The feed then reopens it at once and sends what it had in flight
  again, uncounted (`aged`). A stream aged out before answering anything is a failure like
  any other: what it was sent is more than the server answers in a connection's life.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import grpc

__all__ = [
    "AGED_DETAILS", "ITEM_ERRORS", "MAX_ITEM_ATTEMPTS", "RETRYABLE", "SERVER_FAULTS",
    "Decision", "Failure", "ItemStep", "RetryPolicy", "Step", "Verdict", "aged_out", "decide",
    "item_step",
]

# A stream or message that failed with one of these is sent again (to another replica, when
# there is one): the server did not look at the texts, or could not finish.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
})
# Server faults that one text may cause: a message failing so is split before it is retried.
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# Failures that belong to one text: a message that fails this way is split into single texts,
# and a single text that fails this way gets an error line.
ITEM_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
# Anything else (NOT_FOUND model, UNAUTHENTICATED, PERMISSION_DENIED, ...) stops the feed:
# every other message would fail the same way. What was written stays; a rerun resumes.
MAX_ITEM_ATTEMPTS = 8
# The status details grpc core gives the streams still open when a connection's
# max_connection_age_grace runs out (after its GOAWAY): UNAVAILABLE "max connection age".
AGED_DETAILS = "max connection age"
# Exponents past this already sit at the cap; the bound keeps 2 ** n a small number.
_MAX_EXPONENT = 16


@dataclass(frozen=True)
class RetryPolicy:
    first_s: float = 0.2  # the first backoff ceiling is 2 x this
    cap_s: float = 5.0  # no backoff ceiling above this
    give_up_s: float = 300.0  # no answer written for this long: stop (a rerun resumes)
    max_item_attempts: int = MAX_ITEM_ATTEMPTS


@dataclass(frozen=True)
class Failure:
    """What the feed knows when a stream (or a message on it) fails."""

    code: grpc.StatusCode
    established: bool  # the stream had answered before it failed: it was healthy until now
    attempt: int  # streams in a row that failed before answering, this one included
    idle_s: float  # seconds since the feed last wrote an answer
    aged: bool = False  # the server aged out a stream that was answering (`aged_out`)


class Verdict(Enum):
    RETRY = "retry"  # open the next stream after `delay_s`
    REFUSED = "refused"  # the code is not one a retry can fix: stop the feed
    STALLED = "stalled"  # no answer for give_up_s: stop (servers down?)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay_s: float = 0.0

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


def decide(failure: Failure, policy: RetryPolicy, jitter: float) -> Decision:
    """Retry or give up, and how long to wait first: exponential backoff with full jitter
    (`jitter` is the caller's uniform draw in [0, 1)). A stream that had answered starts the
    backoff over, so a replica going away costs at most 2 x first_s; streams that keep failing
    before answering wait up to cap_s. A stream the server aged out while it was answering is
    reopened at once: the server asked for a new connection, it did not fail (a server that
    ages connections faster than it answers is still stopped by give_up_s)."""
    if failure.code not in RETRYABLE:
        return Decision(Verdict.REFUSED)
    if failure.idle_s > policy.give_up_s:
        return Decision(Verdict.STALLED)
    if failure.aged:
        return Decision(Verdict.RETRY, 0.0)
    exponent = 1 if failure.established else min(max(failure.attempt, 1), _MAX_EXPONENT)
    return Decision(Verdict.RETRY, jitter * min(policy.cap_s, policy.first_s * 2 ** exponent))


class Step(Enum):
    RETRY = "retry"  # send again, batched with others
    ALONE = "alone"  # send again in a message of its own: it may be the text at fault
    ANSWER = "answer"  # stop trying: the failure is written as this id's answer
    STOP = "stop"  # the feed cannot go on: every message would fail the same way


@dataclass(frozen=True)
class ItemStep:
    step: Step
    attempts: int  # the item's failed attempts, this failure counted when it counts


def aged_out(code: grpc.StatusCode, details: str) -> bool:
    """The stream ended because the server aged its connection out (max_connection_age, then
    the grace period): it would have gone on, and a new stream on the new connection will."""
    return code == grpc.StatusCode.UNAVAILABLE and AGED_DETAILS in details.lower()


def item_step(code: grpc.StatusCode, *, lost: bool, texts: int, attempts: int,
              policy: RetryPolicy, aged: bool = False) -> ItemStep:
    """One text's next step. `lost`: its stream broke before answering its message (`code`
    is then the stream's); otherwise the server answered its message of `texts` texts with
    `code`. `attempts`: the text's failed attempts before this one.

    A lost text goes alone after two such failures: a text that brings a replica down must
    not take its neighbours with it. Splitting a message is not an attempt: it only finds
    which text is at fault. Nor is a loss to connection ageing (`aged`, see `aged_out`): the
    server ends connections on a clock, whatever they carry, so counting it would turn a long
    feed's texts into error lines and split its messages for no fault of theirs."""
    if lost and aged:
        return ItemStep(Step.RETRY, attempts)
    if lost:
        counted = attempts + 1
        if counted >= policy.max_item_attempts:
            return ItemStep(Step.ANSWER, counted)
        return ItemStep(Step.ALONE if counted >= 2 else Step.RETRY, counted)
    if texts > 1 and code in SERVER_FAULTS | ITEM_ERRORS:
        return ItemStep(Step.ALONE, attempts)
    if code in RETRYABLE:
        counted = attempts + 1
        return ItemStep(Step.ANSWER if counted >= policy.max_item_attempts else Step.RETRY,
                        counted)
    if code in ITEM_ERRORS:
        return ItemStep(Step.ANSWER, attempts)
    return ItemStep(Step.STOP, attempts)
