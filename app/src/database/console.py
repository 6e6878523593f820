"""Operator-wide storage: reads across every tenant (the console and operator API filters) and bulk
retry/cancel by filter.

Kept apart from tasks.py, whose statements are the engine's hot path: these run for operators, a
few times a minute, and each says which index bounds it. Every statement takes an optional
client_id; NULL means every tenant, which only an operator may ask for (the services check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from app.src.api.models.schedules import Schedule
from app.src.api.models.tasks import Queue, Task
from app.src.database.queues import QUEUE_COLUMNS, to_queue
from app.src.database.schedules import SCHEDULE_COLUMNS, to_schedule
from app.src.database.tasks import (
    CANCEL_CHANNEL,
    CANCELLING,
    NO_FAILED_DEPENDENCY,
    RETRY_DEPENDENCIES,
    RETRY_REFUSED,
    RETRYING,
    TASK_COLUMNS,
    Executor,
    notify_events,
    notify_queues,
    to_task,
)
from app.src.database.workers import WorkerRow

# --- reads ---------------------------------------------------------------------------------------


async def find_task(conn: Executor, *, task_id: UUID) -> Task | None:
    """A task of any tenant, by primary key."""
    rows = await conn.fetch(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
    return to_task(rows[0]) if rows else None


# Keyset pagination, newest first (ids are UUIDv7). With a client: tasks_client (client_id, id);
# without: the primary key read backwards. Filters are applied while walking the index and LIMIT
# stops the walk, so a page costs what it returns plus what it skips.
LIST_TASKS = f"""
SELECT {TASK_COLUMNS} FROM tasks
WHERE ($1::uuid IS NULL OR client_id = $1)
  AND ($2::uuid IS NULL OR id < $2)
  AND ($3::text IS NULL OR queue = $3)
  AND ($4::text IS NULL OR status = $4)
  AND ($5::text IS NULL OR kind = $5)
ORDER BY id DESC
LIMIT $6
"""


async def list_tasks(
    conn: Executor,
    *,
    client_id: UUID | None,
    before: UUID | None,
    queue: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
) -> list[Task]:
    rows = await conn.fetch(LIST_TASKS, client_id, before, queue, status, kind, limit)
    return [to_task(row) for row in rows]


async def find_queue(conn: Executor, *, queue_id: int) -> Queue | None:
    rows = await conn.fetch(f"SELECT {QUEUE_COLUMNS} FROM queues WHERE id = $1", queue_id)
    return to_queue(rows[0]) if rows else None


async def list_queues(
    conn: Executor,
    *,
    client_id: UUID | None,
    after: tuple[str, UUID] | None = None,
    limit: int | None = None,
) -> list[Queue]:
    """Queues in (name, client) order; `after` and `limit` make a keyset page."""
    rows = await conn.fetch(
        f"SELECT {QUEUE_COLUMNS} FROM queues WHERE ($1::uuid IS NULL OR client_id = $1) "
        "AND ($2::text IS NULL OR (name, client_id) > ($2::text, $3::uuid)) "
        "ORDER BY name, client_id LIMIT $4",
        client_id,
        None if after is None else after[0],
        None if after is None else after[1],
        limit,
    )
    return [to_queue(row) for row in rows]


@dataclass(frozen=True, slots=True)
class QueueStats:
    counts: dict[str, int]
    oldest_available_age_s: float | None


@dataclass(frozen=True, slots=True)
class Series:
    """Per minute, oldest first: tasks completed, and the longest start delay (started_at - run_at)
    among them in seconds (None for a minute without completions)."""

    completed: list[int]
    max_lag_s: list[float | None]


# Counts of what is still to do plus dead letters (index: tasks_queue_status (queue_id, status)),
# never of completed or cancelled rows, which grow without bound until pruned.
QUEUE_COUNTS = """
SELECT queue_id, status, count(*) AS n FROM tasks
WHERE queue_id = ANY($1::bigint[])
  AND status IN ('scheduled', 'available', 'running', 'waiting', 'retryable', 'discarded')
GROUP BY queue_id, status
"""

# Lag now: the oldest due available task per queue (index: tasks_claim, available rows only).
QUEUE_LAG = """
SELECT queue_id, EXTRACT(epoch FROM now() - min(run_at))::float8 AS age FROM tasks
WHERE queue_id = ANY($1::bigint[]) AND status = 'available' AND run_at <= now()
GROUP BY queue_id
"""

# Throughput and lag over time: completions per minute over the last `minutes`, with the longest
# wait between due and started among them (index: tasks_finished, finished rows only, by time).
THROUGHPUT = """
SELECT queue_id, floor(EXTRACT(epoch FROM now() - finished_at) / 60)::int AS minutes_ago, count(*) AS n,
       max(EXTRACT(epoch FROM started_at - run_at))::float8 AS max_lag_s
FROM tasks
WHERE finished_at > now() - make_interval(mins => $2) AND status = 'completed'
  AND queue_id = ANY($1::bigint[])
GROUP BY queue_id, minutes_ago
"""


async def queue_stats(conn: Executor, *, queue_ids: Sequence[int]) -> dict[int, QueueStats]:
    ids = list(queue_ids)
    counts: dict[int, dict[str, int]] = {queue_id: {} for queue_id in ids}
    for row in await conn.fetch(QUEUE_COUNTS, ids):
        counts[row["queue_id"]][row["status"]] = int(row["n"])
    lag = {row["queue_id"]: row["age"] for row in await conn.fetch(QUEUE_LAG, ids)}
    return {queue_id: QueueStats(counts[queue_id], lag.get(queue_id)) for queue_id in ids}


async def throughput(conn: Executor, *, queue_ids: Sequence[int], minutes: int) -> dict[int, Series]:
    series = {queue_id: Series([0] * minutes, [None] * minutes) for queue_id in queue_ids}
    for row in await conn.fetch(THROUGHPUT, list(queue_ids), minutes):
        slot = minutes - 1 - min(max(int(row["minutes_ago"]), 0), minutes - 1)
        found = series[row["queue_id"]]
        found.completed[slot] += int(row["n"])
        lag = row["max_lag_s"]
        if lag is not None:
            previous = found.max_lag_s[slot]
            found.max_lag_s[slot] = max(0.0, lag if previous is None else max(previous, lag))
    return series


async def find_schedule(conn: Executor, *, schedule_id: UUID) -> Schedule | None:
    rows = await conn.fetch(f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1", schedule_id)
    return to_schedule(rows[0]) if rows else None


async def list_schedules(conn: Executor, *, client_id: UUID | None, limit: int) -> list[Schedule]:
    rows = await conn.fetch(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE ($1::uuid IS NULL OR client_id = $1) "
        "ORDER BY id DESC LIMIT $2",
        client_id,
        limit,
    )
    return [to_schedule(row) for row in rows]


@dataclass(frozen=True, slots=True)
class SeenWorker:
    client_id: UUID | None  # None: an in-process worker, which serves every client
    worker: WorkerRow


async def list_workers(conn: Executor, *, client_id: UUID | None, within_s: float) -> list[SeenWorker]:
    """Workers seen within `within_s`; with a client, its remote workers and the in-process ones."""
    rows = await conn.fetch(
        "SELECT client_id, id, name, version, remote, kinds, queues, running, last_seen_at FROM workers "
        "WHERE last_seen_at > now() - make_interval(secs => $2) "
        "AND ($1::uuid IS NULL OR client_id = $1 OR client_id IS NULL) "
        "ORDER BY last_seen_at DESC LIMIT 1000",
        client_id,
        within_s,
    )
    return [
        SeenWorker(r["client_id"], WorkerRow(*(r[name] for name in WorkerRow.__dataclass_fields__)))
        for r in rows
    ]


# --- bulk actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskFilter:
    client_id: UUID | None = None
    queue: str | None = None
    kind: str | None = None
    status: str | None = None
    created_before: datetime | None = None
    created_after: datetime | None = None


# One chunk: lock up to $8 matching rows (SKIP LOCKED: a worker holding one keeps it), then one
# guarded UPDATE. The caller repeats until a chunk comes back short. The status guard ($7) is the
# state machine's list of sources for the target status.
_FILTER = """($1::uuid IS NULL OR client_id = $1)
      AND ($2::text IS NULL OR queue = $2)
      AND ($3::text IS NULL OR kind = $3)
      AND ($4::text IS NULL OR status = $4)
      AND ($5::timestamptz IS NULL OR created_at < $5)
      AND ($6::timestamptz IS NULL OR created_at > $6)
      AND status = ANY($7::text[])"""
_MATCH = f"""
    SELECT id FROM tasks
    WHERE {_FILTER}
    ORDER BY id
    LIMIT $8
    FOR UPDATE SKIP LOCKED
"""
# a retry picks no task it would refuse (a dependent whose dependency failed)
_MATCH_RETRY = _MATCH.replace("ORDER BY id", f"AND NOT {RETRY_REFUSED}\n    ORDER BY id")
# a cancel picks no running task it already asked to stop: such a task stays running, so picked
# first by id again and again, it filled every chunk and the call never reached the tasks behind
CANCEL_ASKED = "(status = 'running' AND cancel_requested)"
_MATCH_CANCEL = _MATCH.replace("ORDER BY id", f"AND NOT {CANCEL_ASKED}\n    ORDER BY id")

BULK_RETRY = f"""
WITH picked AS ({_MATCH_RETRY}),
deps AS ({RETRY_DEPENDENCIES.format(ids="ARRAY(SELECT id FROM picked)")}
),
changed AS (
    UPDATE tasks t
    SET {RETRYING}
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.status = ANY($7::text[]) AND {NO_FAILED_DEPENDENCY}
    RETURNING t.id, t.client_id, t.queue_id
),
{notify_queues("woken", "SELECT queue_id FROM changed")},
{notify_events("changed")}
SELECT client_id, count(*) AS n, (SELECT n FROM woken) + (SELECT n FROM notified) AS _n
FROM changed GROUP BY client_id
"""

# Cancel as the single cancel does: at once unless running; a running task is asked to stop.
BULK_CANCEL = f"""
WITH picked AS ({_MATCH_CANCEL}),
changed AS (
    UPDATE tasks t
    SET {CANCELLING}
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.status = ANY($7::text[])
    RETURNING t.id, t.client_id, t.status
),
{notify_events("changed")},
stopping AS (
    SELECT count(pg_notify('{CANCEL_CHANNEL}', id::text)) AS n FROM changed WHERE status = 'running'
)
SELECT client_id, count(*) AS n, (SELECT n FROM notified) + (SELECT n FROM stopping) AS _n
FROM changed GROUP BY client_id
"""


async def _bulk(
    conn: Executor, statement: str, where: TaskFilter, *, from_statuses: Sequence[str], chunk: int
) -> dict[UUID, int]:
    rows = await conn.fetch(
        statement,
        where.client_id,
        where.queue,
        where.kind,
        where.status,
        where.created_before,
        where.created_after,
        list(from_statuses),
        chunk,
    )
    return {row["client_id"]: int(row["n"]) for row in rows}


async def bulk_retry_chunk(
    conn: Executor, where: TaskFilter, *, from_statuses: Sequence[str], chunk: int
) -> dict[UUID, int]:
    """Retry up to `chunk` matching tasks; returns how many per tenant."""
    return await _bulk(conn, BULK_RETRY, where, from_statuses=from_statuses, chunk=chunk)


async def bulk_cancel_chunk(
    conn: Executor, where: TaskFilter, *, from_statuses: Sequence[str], chunk: int
) -> dict[UUID, int]:
    """Cancel up to `chunk` matching tasks; returns how many per tenant."""
    return await _bulk(conn, BULK_CANCEL, where, from_statuses=from_statuses, chunk=chunk)


async def count_matching(
    conn: Executor, where: TaskFilter, *, statuses: Sequence[str], retry: bool = False
) -> int:
    """How many tasks a bulk action (a retry, or else a cancel) would touch now (its confirmation)."""
    refused = f"AND NOT {RETRY_REFUSED}" if retry else f"AND NOT {CANCEL_ASKED}"
    rows = await conn.fetch(
        f"SELECT count(*) AS n FROM tasks WHERE {_FILTER} {refused}",
        where.client_id,
        where.queue,
        where.kind,
        where.status,
        where.created_before,
        where.created_after,
        list(statuses),
    )
    return int(rows[0]["n"])
