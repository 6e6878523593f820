"""The failure policy: retried with backoff, or discarded; the same for worker, poller and rescuer."""

import random
from dataclasses import dataclass

import pytest

from app.src.api.engine.outcomes import MAX_ERROR_CHARS, after_failure, backoff_seconds, clip_error
from app.src.api.state_machine import Status


@dataclass
class Queue:
    min_backoff_s: float = 1.0
    max_backoff_s: float = 60.0


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "permanent", "expected"),
    [
        (1, 3, False, Status.RETRYABLE),
        (2, 3, False, Status.RETRYABLE),
        (3, 3, False, Status.DISCARDED),
        (1, 3, True, Status.DISCARDED),
        (1, 1, False, Status.DISCARDED),
    ],
)
def test_after_failure(attempt: int, max_attempts: int, permanent: bool, expected: Status) -> None:
    decided = after_failure(attempt=attempt, max_attempts=max_attempts, queue=Queue(), permanent=permanent)
    assert decided.status is expected
    # a retry always has a delay within the queue's bounds; a dead letter none
    if expected is Status.RETRYABLE:
        assert decided.retry_in_s is not None
        assert 1.0 <= decided.retry_in_s <= 60.0
    else:
        assert decided.retry_in_s is None


def test_after_failure_honours_retry_after_within_the_queue_maximum() -> None:
    queue = Queue(min_backoff_s=1, max_backoff_s=60)
    assert after_failure(attempt=1, max_attempts=5, queue=queue, retry_after_s=30).retry_in_s >= 30  # type: ignore[operator]
    assert after_failure(attempt=1, max_attempts=5, queue=queue, retry_after_s=600).retry_in_s == 60


def test_backoff_grows_exponentially_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 20):
        delay = backoff_seconds(attempt=attempt, min_backoff_s=1, max_backoff_s=60, rng=rng)
        assert 1 <= delay <= min(60, 2 ** (attempt - 1))
    ceilings = [
        max(backoff_seconds(attempt=a, min_backoff_s=1, max_backoff_s=1000, rng=rng) for _ in range(200))
        for a in (1, 4, 8)
    ]
    assert ceilings[0] == 1
    assert 4 < ceilings[1] <= 8
    assert 64 < ceilings[2] <= 128


def test_backoff_honours_retry_after_but_not_past_the_maximum() -> None:
    assert backoff_seconds(attempt=1, min_backoff_s=1, max_backoff_s=60, retry_after_s=30) >= 30
    assert backoff_seconds(attempt=1, min_backoff_s=1, max_backoff_s=60, retry_after_s=600) == 60


def test_errors_are_clipped_to_the_stored_length() -> None:
    assert clip_error("short") == "short"
    clipped = clip_error("x" * 5000)
    assert len(clipped) == MAX_ERROR_CHARS
    assert clipped.endswith("…")


def test_a_traceback_is_clipped_to_8_kib_of_utf8_keeping_its_end() -> None:
    from app.src.api.engine.outcomes import clip_traceback

    short = "Traceback (most recent call last):\n  ValueError: x\n"
    assert clip_traceback(short) == short
    long = (
        "Traceback (most recent call last):\n"
        + '  File "ü.py", line 1, in f\n' * 1000
        + "ValueError: the end"
    )
    clipped = clip_traceback(long)
    assert len(clipped.encode()) <= 8192
    assert clipped.startswith("…")
    assert clipped.endswith("ValueError: the end")


def test_backoff_of_any_attempt_stays_within_the_queue_bounds() -> None:
    """Past attempt 1024 the exponential once overflowed a float (OverflowError)."""
    for attempt in (1024, 1025, 2000, 10**6):
        delay = backoff_seconds(attempt=attempt, min_backoff_s=1, max_backoff_s=3600)
        assert 1 <= delay <= 3600
        assert backoff_seconds(attempt=attempt, min_backoff_s=0, max_backoff_s=0) == 0
    decided = after_failure(attempt=1500, max_attempts=2000, queue=Queue())
    assert decided.status is Status.RETRYABLE
    assert decided.retry_in_s is not None
    assert 1.0 <= decided.retry_in_s <= 60.0
