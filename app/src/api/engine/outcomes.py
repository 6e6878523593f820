"""What a finished attempt means: its recorded outcome, and where a failed one leaves the task.

One policy for every place that ends an attempt — the worker, the http poller and the lease
rescuer — so a failure means the same retry, backoff and dead letter wherever it is noticed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from app.src.api.state_machine import Status
from app.src.database import tasks as task_store
from app.src.utils.json_text import storable_text

MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_BYTES = 8192  # the task_attempts.traceback check (migration 0009) bounds it too


class Outcome(StrEnum):
    """The `outcome` of an attempt record (`GET /api/tasks/{id}/attempts`)."""

    COMPLETED = "completed"
    FAILED = "failed"  # raised, timed out, or answered with a retryable or permanent failure
    INVALID_PAYLOAD = "invalid_payload"  # the stored payload no longer fits the kind's contract
    CANCELLED = "cancelled"
    WAITING = "waiting"  # handed to an external provider (the http kind's follow_async)
    DEFERRED = "deferred"  # the handler could not start; not an attempt, never recorded
    LOST = "lost"  # the lease expired: the worker died, stalled or fenced itself
    SUSPENDED = "suspended"  # a composed task stopped to wait or to record (engine/durable.py)


# the outcome label of taskgate_task_outcomes_total for the status an attempt left its task in:
# completed, retried, discarded, cancelled (and waiting)
METRIC_OUTCOME = {"retryable": "retried"}


class Backoff(Protocol):
    """The queue settings a retry depends on (a Queue, or a row read with the expired lease)."""

    @property
    def min_backoff_s(self) -> float: ...

    @property
    def max_backoff_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class AfterFailure:
    status: Status  # retryable or discarded
    retry_in_s: float | None  # seconds until the next attempt; None when discarded


def after_failure(
    *,
    attempt: int,
    max_attempts: int,
    queue: Backoff,
    retry_after_s: float | None = None,
    permanent: bool = False,
    retry_base: int = 0,
    rng: random.Random | None = None,
) -> AfterFailure:
    """A failed attempt: retried after a backoff, or discarded when permanent or the last one.

    `retry_base` is the task's attempts_before_retry: the attempts that were no failure of its
    present life (those before a retry by hand, and its suspensions, which move the attempt number
    and max_attempts on together). The backoff grows with the failures after it, not with the
    attempt number: a composed task suspended at each of twenty steps fails for the first time at
    attempt 21, and is retried after min_backoff_s as any first failure is."""
    if permanent or attempt >= max_attempts:
        return AfterFailure(Status.DISCARDED, None)
    delay = backoff_seconds(
        attempt=attempt - retry_base,
        min_backoff_s=queue.min_backoff_s,
        max_backoff_s=queue.max_backoff_s,
        retry_after_s=retry_after_s,
        rng=rng,
    )
    return AfterFailure(Status.RETRYABLE, delay)


def backoff_seconds(
    *,
    attempt: int,
    min_backoff_s: float,
    max_backoff_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter in [min, min·2^(attempt-1)], capped at max.

    A `retry_after_s` that the task reports (an HTTP Retry-After, say) is honoured as a floor,
    still bounded by the queue's max backoff.
    """
    # 2.0 ** 1023 is the largest power of two a float holds; from attempt 1025 on (retries by hand
    # add attempts) 2 ** (attempt - 1) raised OverflowError, and failed every rescue batch with it.
    # A product past the float range is inf, and the ceiling then max_backoff_s.
    ceiling = min(max_backoff_s, min_backoff_s * 2.0 ** min(max(0, attempt - 1), 1023))
    draw = (rng or _random).uniform(min_backoff_s, max(min_backoff_s, ceiling))
    if retry_after_s is not None:
        draw = max(draw, retry_after_s)
    return float(min(max_backoff_s, max(min_backoff_s, draw)))


def decide_rescue(lease: task_store.ExpiredLease) -> tuple[Status, float | None]:
    """An expired lease is a failed attempt like any other (the worker cannot say why)."""
    decided = after_failure(
        attempt=lease.attempt, max_attempts=lease.max_attempts, queue=lease, retry_base=lease.retry_base
    )
    return decided.status, decided.retry_in_s


async def rescue_expired_leases(conn: Any, *, limit: int = 1000) -> list[Mapping[str, Any]]:
    """Rescue expired leases (an asyncpg connection): retried or discarded by the failure policy."""
    return await task_store.rescue_expired(conn, decide=decide_rescue, outcome=Outcome.LOST, limit=limit)


def clip_error(text: str) -> str:
    """An error message as stored on the task and its attempt: at most MAX_ERROR_CHARS, storable.

    Error texts come from outside (a response body, an exception's message, a remote worker's
    report); PostgreSQL's text refuses NUL, and one such row would fail the whole completion batch
    it is written in, again at every retry."""
    text = storable_text(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def clip_traceback(text: str) -> str:
    """A traceback bounded to 8 KiB of UTF-8, keeping its end (where the exception is raised)."""
    text = storable_text(text)
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_TRACEBACK_BYTES:
        return text
    # "…" is 3 bytes; a character cut in half at the start is dropped
    return "…" + data[-(MAX_TRACEBACK_BYTES - 3) :].decode("utf-8", "ignore")


_random = random.SystemRandom()
