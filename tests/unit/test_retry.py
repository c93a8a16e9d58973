"""client/retry.py as tables: what a failed stream or message turns into, and the backoff."""

from __future__ import annotations

import grpc
import pytest
from bertstream.client.retry import (
    Decision,
    Failure,
    ItemStep,
    RetryPolicy,
    Step,
    Verdict,
    aged_out,
    decide,
    item_step,
)

C = grpc.StatusCode
POLICY = RetryPolicy(first_s=0.2, cap_s=5.0, give_up_s=300.0, max_item_attempts=8)


@pytest.mark.parametrize(("failure", "jitter", "want"), [
    # Codes a retry cannot fix stop the feed, whatever else is true.
    (Failure(C.NOT_FOUND, False, 1, 0.0), 1.0, Decision(Verdict.REFUSED)),
    (Failure(C.UNAUTHENTICATED, True, 0, 0.0), 1.0, Decision(Verdict.REFUSED)),
    (Failure(C.PERMISSION_DENIED, False, 1, 0.0), 1.0, Decision(Verdict.REFUSED)),
    (Failure(C.UNIMPLEMENTED, False, 1, 0.0), 1.0, Decision(Verdict.REFUSED)),
    # A whole stream ending INVALID_ARGUMENT (a message that did not parse) is not one text's.
    (Failure(C.INVALID_ARGUMENT, True, 0, 0.0), 1.0, Decision(Verdict.REFUSED)),
    (Failure(C.NOT_FOUND, False, 1, 1e6), 1.0, Decision(Verdict.REFUSED)),
    # Nothing written for longer than give_up_s: stop, even on a retryable code.
    (Failure(C.UNAVAILABLE, False, 3, 300.5), 1.0, Decision(Verdict.STALLED)),
    (Failure(C.UNAVAILABLE, False, 3, 300.0), 1.0, Decision(Verdict.RETRY, 1.6)),
    # A stream that had answered starts the backoff over: one step, whatever the count.
    (Failure(C.UNAVAILABLE, True, 0, 1.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.UNAVAILABLE, True, 7, 1.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    # Streams that fail before answering double the ceiling up to the cap.
    (Failure(C.UNAVAILABLE, False, 1, 1.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.UNAVAILABLE, False, 2, 1.0), 1.0, Decision(Verdict.RETRY, 0.8)),
    (Failure(C.UNAVAILABLE, False, 4, 1.0), 1.0, Decision(Verdict.RETRY, 3.2)),
    (Failure(C.UNAVAILABLE, False, 5, 1.0), 1.0, Decision(Verdict.RETRY, 5.0)),
    (Failure(C.UNAVAILABLE, False, 10_000, 1.0), 1.0, Decision(Verdict.RETRY, 5.0)),
    (Failure(C.UNAVAILABLE, False, 0, 1.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    # Full jitter: the draw scales the ceiling.
    (Failure(C.UNAVAILABLE, False, 2, 1.0), 0.5, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.UNAVAILABLE, False, 2, 1.0), 0.0, Decision(Verdict.RETRY, 0.0)),
    # Every retryable code retries.
    (Failure(C.RESOURCE_EXHAUSTED, True, 0, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.ABORTED, False, 1, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.DEADLINE_EXCEEDED, False, 1, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.CANCELLED, False, 1, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.UNKNOWN, False, 1, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    (Failure(C.INTERNAL, True, 0, 0.0), 1.0, Decision(Verdict.RETRY, 0.4)),
    # The server aged the connection out: reopen at once, however many failed before.
    (Failure(C.UNAVAILABLE, True, 0, 1.0, aged=True), 1.0, Decision(Verdict.RETRY, 0.0)),
    (Failure(C.UNAVAILABLE, False, 6, 1.0, aged=True), 1.0, Decision(Verdict.RETRY, 0.0)),
    # ... but a feed that answers nothing for give_up_s still stops.
    (Failure(C.UNAVAILABLE, False, 1, 300.5, aged=True), 1.0, Decision(Verdict.STALLED)),
])
def test_decide(failure: Failure, jitter: float, want: Decision) -> None:
    got = decide(failure, POLICY, jitter)
    assert got.verdict is want.verdict
    assert got.delay_s == pytest.approx(want.delay_s)
    assert got.retry is (want.verdict is Verdict.RETRY)


@pytest.mark.parametrize(("code", "lost", "texts", "attempts", "want"), [
    # Lost with its stream: counted; alone from the second loss; answered at the eighth.
    (C.UNAVAILABLE, True, 32, 0, ItemStep(Step.RETRY, 1)),
    (C.UNAVAILABLE, True, 32, 1, ItemStep(Step.ALONE, 2)),
    (C.CANCELLED, True, 1, 6, ItemStep(Step.ALONE, 7)),
    (C.UNAVAILABLE, True, 1, 7, ItemStep(Step.ANSWER, 8)),
    # A server fault or an item error in a message of several: split, not counted.
    (C.INTERNAL, False, 3, 0, ItemStep(Step.ALONE, 0)),
    (C.UNKNOWN, False, 2, 5, ItemStep(Step.ALONE, 5)),
    (C.INVALID_ARGUMENT, False, 3, 0, ItemStep(Step.ALONE, 0)),
    (C.OUT_OF_RANGE, False, 2, 1, ItemStep(Step.ALONE, 1)),
    # Alone, a server fault is retried like any retryable code, until attempts run out.
    (C.INTERNAL, False, 1, 0, ItemStep(Step.RETRY, 1)),
    (C.INTERNAL, False, 1, 7, ItemStep(Step.ANSWER, 8)),
    (C.UNAVAILABLE, False, 3, 2, ItemStep(Step.RETRY, 3)),
    (C.RESOURCE_EXHAUSTED, False, 32, 7, ItemStep(Step.ANSWER, 8)),
    # Alone, an item error is the text's answer.
    (C.INVALID_ARGUMENT, False, 1, 0, ItemStep(Step.ANSWER, 0)),
    (C.OUT_OF_RANGE, False, 1, 3, ItemStep(Step.ANSWER, 3)),
    # Anything else would fail every message: the feed stops.
    (C.NOT_FOUND, False, 1, 0, ItemStep(Step.STOP, 0)),
    (C.NOT_FOUND, False, 3, 0, ItemStep(Step.STOP, 0)),
    (C.PERMISSION_DENIED, False, 1, 2, ItemStep(Step.STOP, 2)),
    (C.FAILED_PRECONDITION, False, 5, 0, ItemStep(Step.STOP, 0)),
])
def test_item_step(code: grpc.StatusCode, lost: bool, texts: int, attempts: int,
                   want: ItemStep) -> None:
    assert item_step(code, lost=lost, texts=texts, attempts=attempts, policy=POLICY) == want


@pytest.mark.parametrize(("attempts", "texts"), [(0, 32), (1, 16), (7, 1)])
def test_a_loss_to_connection_ageing_is_not_an_attempt(attempts: int, texts: int) -> None:
    assert item_step(C.UNAVAILABLE, lost=True, texts=texts, attempts=attempts, policy=POLICY,
                     aged=True) == ItemStep(Step.RETRY, attempts)


@pytest.mark.parametrize(("code", "details", "want"), [
    (C.UNAVAILABLE, "max connection age", True),
    (C.UNAVAILABLE, "Max Connection Age", True),
    (C.UNAVAILABLE, "Socket closed", False),
    (C.UNAVAILABLE, "stream ended early", False),
    (C.CANCELLED, "max connection age", False),
    (C.INTERNAL, "max connection age", False),
])
def test_aged_out(code: grpc.StatusCode, details: str, want: bool) -> None:
    assert aged_out(code, details) is want


def test_item_attempts_follow_the_policy() -> None:
    two = RetryPolicy(max_item_attempts=2)
    assert item_step(C.UNAVAILABLE, lost=True, texts=1, attempts=0, policy=two) == \
        ItemStep(Step.RETRY, 1)
    assert item_step(C.UNAVAILABLE, lost=True, texts=1, attempts=1, policy=two) == \
        ItemStep(Step.ANSWER, 2)
    assert item_step(C.UNAVAILABLE, lost=False, texts=4, attempts=1, policy=two) == \
        ItemStep(Step.ANSWER, 2)
