"""Every task status transition, decided in one place.

Storage guards its UPDATEs with the source statuses listed here (compare-and-set), so a change
that the table below does not allow can never be written, and a task that finished meanwhile is
never overwritten (River #1302).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    SCHEDULED = "scheduled"  # run_at in the future
    AVAILABLE = "available"  # ready to be claimed
    RUNNING = "running"  # claimed; a worker holds its lease
    WAITING = "waiting"  # for a provider (polled), a signal, children or dependencies: see waiting_for
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
            Status.WAITING,  # a provider's answer, a signal or children to wait for (suspended)
            Status.AVAILABLE,  # released unfinished by a worker shutting down, or suspended to resume
            Status.SCHEDULED,  # suspended in a durable sleep (ctx.sleep)
        }
    ),
    Status.WAITING: frozenset(
        {
            Status.COMPLETED,
            Status.RETRYABLE,
            Status.DISCARDED,
            Status.CANCELLED,
            Status.AVAILABLE,  # the signal, the last child or the last dependency arrived (or a timeout)
        }
    ),
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
