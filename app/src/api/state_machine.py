"""Every task status transition, decided in one place.

Storage guards its UPDATEs with the source statuses listed here (compare-and-set), so a change
that the table below does not allow can never be written, and a task that finished meanwhile is
never overwritten (River #1302).
"""

from __future__ import annotations

import random
from enum import StrEnum


class Status(StrEnum):
    SCHEDULED = "scheduled"  # run_at in the future
    AVAILABLE = "available"  # ready to be claimed
    RUNNING = "running"  # claimed; a worker holds its lease
    WAITING = "waiting"  # an external provider is working; the scheduler polls it
    RETRYABLE = "retryable"  # failed; next attempt at run_at
    COMPLETED = "completed"
    DISCARDED = "discarded"  # dead letter: attempts exhausted or a permanent error
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.DISCARDED, Status.CANCELLED})
UNFINISHED = frozenset(Status) - TERMINAL

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SCHEDULED: frozenset({Status.AVAILABLE, Status.CANCELLED}),
    Status.AVAILABLE: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RUNNING: frozenset(
        {
            Status.COMPLETED,
            Status.RETRYABLE,
            Status.DISCARDED,
            Status.CANCELLED,
            Status.WAITING,
            Status.AVAILABLE,  # released unfinished by a worker shutting down
        }
    ),
    Status.WAITING: frozenset({Status.COMPLETED, Status.RETRYABLE, Status.DISCARDED, Status.CANCELLED}),
    Status.RETRYABLE: frozenset({Status.AVAILABLE, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.DISCARDED: frozenset({Status.AVAILABLE}),  # manual retry
    Status.CANCELLED: frozenset({Status.AVAILABLE}),  # manual retry
}


class IllegalTransition(Exception):
    def __init__(self, source: Status, target: Status) -> None:
        super().__init__(f"a task cannot go from {source} to {target}")
        self.source = source
        self.target = target


def can_transition(source: Status, target: Status) -> bool:
    return target in TRANSITIONS[source]


def transition(source: Status, target: Status) -> Status:
    """Return target if the move is legal; raise IllegalTransition otherwise."""
    if not can_transition(source, target):
        raise IllegalTransition(source, target)
    return target


def sources(target: Status) -> list[str]:
    """Statuses a task may be in for `target` to be written: the guard of every UPDATE."""
    return sorted(str(source) for source, targets in TRANSITIONS.items() if target in targets)


def after_failure(*, attempt: int, max_attempts: int, permanent: bool) -> Status:
    """A failed attempt ends in retryable, or discarded when it was permanent or the last one."""
    if permanent or attempt >= max_attempts:
        return Status.DISCARDED
    return Status.RETRYABLE


# after_failure for the rescuer, which decides in SQL for a whole batch of expired leases
# (a unit test keeps the two in agreement).
RESCUE_STATUS_SQL = "CASE WHEN t.attempts >= t.max_attempts THEN 'discarded' ELSE 'retryable' END"


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
    ceiling = min(max_backoff_s, min_backoff_s * 2 ** max(0, attempt - 1))
    draw = (rng or _random).uniform(min_backoff_s, max(min_backoff_s, ceiling))
    if retry_after_s is not None:
        draw = max(draw, retry_after_s)
    return float(min(max_backoff_s, max(min_backoff_s, draw)))


_random = random.SystemRandom()
