"""Flow control as a reader sees it: why a task waits (`blocked_by`), and the destinations' limits.

The rules themselves live in the claim (app/src/database/tasks.py, THE KEYED CLAIM and
CLAIM_LIMITED); `blocked_by` asks PostgreSQL which of those same rules hold one task now
(app/src/database/flow.py), so the answer cannot drift from what the claim does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from app.src.api.models.http import destination
from app.src.api.models.tasks import BlockedBy, Task
from app.src.api.state_machine import Status
from app.src.database import flow as store
from app.src.database.tasks import LimitedQueue

if TYPE_CHECKING:
    from app.database import Database

# statuses that wait for something the claim decides (waiting tasks wait for their provider)
CLAIMABLE_LATER = frozenset({Status.SCHEDULED, Status.AVAILABLE, Status.RETRYABLE})
NOT_RUNNING = frozenset({Status.SCHEDULED, Status.AVAILABLE, Status.RETRYABLE, Status.WAITING})


def _http_host(task: Task) -> str | None:
    if task.kind != "http" or not isinstance(task.payload.get("url"), str):
        return None
    try:
        return destination(task.payload["url"])
    except ValueError:
        return None


async def blocked_by(db: Database, task: Task) -> list[BlockedBy] | None:
    """Every reason that keeps `task` from running now; None for a running or finished task."""
    status = Status(task.status)
    if status not in NOT_RUNNING:
        return None
    reasons: list[BlockedBy] = []
    async with db.driver() as conn:
        holds = await store.holds(conn, client_id=task.client_id, task_id=task.id)
        host = _http_host(task)
        host_rows = []
        if host is not None and status in CLAIMABLE_LATER:
            host_rows = await store.hosts(
                conn,
                only=[host],
                max_concurrency=db.settings.HTTP_HOST_MAX_CONCURRENCY,
                circuit_failures=db.settings.HTTP_CIRCUIT_FAILURES,
            )
    if holds is None:
        return None
    if status is Status.WAITING:
        return _waiting(task)  # its composition or its provider, not a claim rule
    if holds.run_at_future:
        reasons.append(BlockedBy(reason="run_at", detail=f"due at {task.run_at.isoformat()}"))
    if holds.queue_paused:
        reasons.append(BlockedBy(reason="queue_paused", detail=f"queue {task.queue!r} is paused"))
    if holds.queue_full:
        reasons.append(
            _limit(
                "queue_concurrency",
                f"queue {task.queue!r} runs its max_concurrency of",
                holds.max_concurrency,
            )
        )
    if holds.queue_rate_empty:
        reasons.append(
            _limit(
                "queue_rate_limit",
                f"queue {task.queue!r} spent its rate_limit_per_s of",
                holds.rate_limit_per_s,
            )
        )
    if holds.key_full:
        reasons.append(
            _limit(
                "key_concurrency",
                f"key {task.concurrency_key!r} runs its key_concurrency of",
                holds.key_concurrency,
            )
        )
    if holds.key_rate_empty:
        reasons.append(
            _limit(
                "key_rate_limit",
                f"key {task.concurrency_key!r} spent its key_rate_limit_per_s of",
                holds.key_rate_limit_per_s,
            )
        )
    for row in host_rows:
        if row.circuit != "closed":
            reasons.append(
                BlockedBy(
                    reason="host_unhealthy",
                    detail=f"{row.host}: circuit {row.circuit} after {row.consecutive_failures} failures",
                )
            )
        elif row.in_flight >= row.concurrency_limit:
            reasons.append(
                BlockedBy(
                    reason="host_concurrency",
                    detail=f"{row.host}: {row.in_flight} in flight, limit {row.concurrency_limit}",
                )
            )
    if not holds.has_worker:
        reasons.append(
            BlockedBy(
                reason="no_worker", detail=f"no live worker serves kind {task.kind!r} in queue {task.queue!r}"
            )
        )
    return reasons


def _limit(reason: str, what: str, limit: Any) -> BlockedBy:
    return BlockedBy(
        reason=reason, detail=f"{what} {limit:g}" if isinstance(limit, float) else f"{what} {limit}"
    )


async def task_hosts(
    db: Database, *, client_id: UUID | None, limit: int, after: str | None = None
) -> tuple[list[store.HostRow], str | None]:
    """A page of the destinations, in name order after `after`, with their adaptive limit,
    in-flight count, circuit and recent error rate, and the host the next page starts after (None:
    the last page). An API client sees the hosts its own tasks called (None: every host, for
    operators). Paged: a client calling 100,000 destinations got them all in one 17 MB answer."""
    async with db.driver() as conn:
        if client_id is None:
            rows = await store.hosts(
                conn,
                only=None,
                max_concurrency=db.settings.HTTP_HOST_MAX_CONCURRENCY,
                circuit_failures=db.settings.HTTP_CIRCUIT_FAILURES,
                after=after,
                limit=limit + 1,
            )
            return rows[:limit], rows[limit - 1].host if len(rows) > limit else None
        names = await store.client_hosts(conn, client_id=client_id, after=after, limit=limit + 1)
        if not names:
            return [], None
        rows = await store.hosts(
            conn,
            only=names[:limit],
            max_concurrency=db.settings.HTTP_HOST_MAX_CONCURRENCY,
            circuit_failures=db.settings.HTTP_CIRCUIT_FAILURES,
            limit=limit,
        )
        # the next page follows this page's names (a name with no state row shows nowhere)
        return rows, names[limit - 1] if len(names) > limit else None


def _waiting(task: Task) -> list[BlockedBy]:
    """A waiting task waits for what `waiting_for` names: its dependencies, its children, a
    signal (made available by the event itself), or its provider (an http task polled for its
    status: no reason of ours)."""
    waiting = task.waiting_for or {}
    kind = waiting.get("type")
    if kind == "dependencies":
        ids = waiting.get("task_ids") or []
        return [BlockedBy(reason="dependencies", detail=f"waits for {len(ids)} task(s) to complete: "
                          + ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else ""))]  # fmt: skip
    if kind == "children":
        return [BlockedBy(reason="children", detail="waits for its children to finish (ctx.gather)")]
    if kind == "signal":
        name = waiting.get("name")
        return [
            BlockedBy(
                reason="signal", detail=f"waits for signal {name!r} (POST /api/tasks/{{id}}/signals/{name})"
            )
        ]
    return []


def claim_order(
    limited: Sequence[LimitedQueue], *, limited_first: bool, turn: int
) -> list[LimitedQueue | None]:
    """The order in which a claim round asks its sources, None standing for the unlimited claim;
    each is asked only while the round still has room. The unlimited claim goes first, unless the
    round before filled up before a limited queue with work was asked: then the limited queues go
    first (asked after the unlimited claim in every round, a limited queue waited for as long as an
    unlimited queue's backlog filled the worker). Among themselves the limited queues take turns
    at going first: `turn` rotates them."""
    turn %= max(1, len(limited))
    turned: list[LimitedQueue | None] = [*limited[turn:], *limited[:turn]]
    return [*turned, None] if limited_first else [None, *turned]
