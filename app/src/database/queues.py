"""Queue storage: settings per (client, name), counts, pause/resume/purge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import dacite

from app.src.api.models.tasks import Queue
from app.src.database.tasks import AVAILABLE_CHANNEL, CANCELLING, Executor, notify_events

QUEUE_COLUMNS = (
    "id, client_id, name, max_concurrency, rate_limit_per_s, max_attempts, min_backoff_s, "
    "max_backoff_s, paused, created_at, updated_at, key_concurrency, key_rate_limit_per_s"
)
SETTINGS = (
    "max_concurrency",
    "rate_limit_per_s",
    "max_attempts",
    "min_backoff_s",
    "max_backoff_s",
    "paused",
    "key_concurrency",
    "key_rate_limit_per_s",
)
_DACITE = dacite.Config(check_types=False)


def to_queue(row: Mapping[str, Any]) -> Queue:
    return dacite.from_dict(Queue, dict(row), config=_DACITE)


async def get(conn: Executor, *, client_id: UUID, name: str, for_update: bool = False) -> Queue | None:
    """The queue; `for_update` locks its row until the transaction ends (read, check, then write)."""
    lock = " FOR UPDATE" if for_update else ""
    rows = await conn.fetch(
        f"SELECT {QUEUE_COLUMNS} FROM queues WHERE client_id = $1 AND name = $2{lock}", client_id, name
    )
    return to_queue(rows[0]) if rows else None


async def get_by_ids(conn: Executor, ids: list[int]) -> list[Queue]:
    rows = await conn.fetch(f"SELECT {QUEUE_COLUMNS} FROM queues WHERE id = ANY($1::bigint[])", ids)
    return [to_queue(row) for row in rows]


async def ensure(conn: Executor, *, client_id: UUID, name: str) -> Queue:
    """The queue, created with defaults on first use (queues are implicit, like Oban's)."""
    rows = await conn.fetch(
        f"""
        WITH created AS (
            INSERT INTO queues (client_id, name) VALUES ($1, $2)
            ON CONFLICT (client_id, name) DO NOTHING
            RETURNING {QUEUE_COLUMNS}
        )
        SELECT {QUEUE_COLUMNS} FROM created
        UNION ALL
        SELECT {QUEUE_COLUMNS} FROM queues WHERE client_id = $1 AND name = $2
        LIMIT 1
        """,
        client_id,
        name,
    )
    if not rows:
        # Another transaction inserted it after this statement's snapshot was taken: DO NOTHING
        # waited for its commit, but the SELECT above cannot see it. A new statement can.
        rows = await conn.fetch(
            f"SELECT {QUEUE_COLUMNS} FROM queues WHERE client_id = $1 AND name = $2", client_id, name
        )
    return to_queue(rows[0])


async def list_for_client(
    conn: Executor, *, client_id: UUID, after: str | None = None, limit: int | None = None
) -> list[Queue]:
    """A client's queues in name order; `after` and `limit` make a keyset page (the unique index
    on (client_id, name))."""
    rows = await conn.fetch(
        f"SELECT {QUEUE_COLUMNS} FROM queues WHERE client_id = $1 AND ($2::text IS NULL OR name > $2) "
        "ORDER BY name LIMIT $3",
        client_id,
        after,
        limit,
    )
    return [to_queue(row) for row in rows]


class QueueLimitReached(Exception):
    """Creating these queues would take the client past its cap on queues; none was created."""

    def __init__(self, names: list[str], cap: int) -> None:
        super().__init__(f"{len(names)} new queue(s) past the cap of {cap}")
        self.names = names
        self.cap = cap


async def check_room(conn: Executor, *, client_id: UUID, names: list[str], cap: int) -> None:
    """Raise QueueLimitReached unless `names` (queues this client does not have yet) fit under
    `cap` beside its queues. Call it in the transaction that creates them: it holds the client's
    queue-creation lock until that ends, so two creations cannot both take the last place. The
    count stops at cap + 1 (index on (client_id, name)): bounded whatever a client has."""
    await conn.fetch(
        "SELECT pg_advisory_xact_lock(hashtextextended('queues:' || $1::uuid::text, 0))", client_id
    )
    rows = await conn.fetch(
        "SELECT count(*) AS n FROM (SELECT 1 FROM queues WHERE client_id = $1 LIMIT $2) mine",
        client_id,
        cap + 1,
    )
    if int(rows[0]["n"]) + len(names) > cap:
        raise QueueLimitReached(names, cap)


async def get_many(conn: Executor, *, client_id: UUID, names: list[str]) -> dict[str, Queue]:
    """Those of the named queues the client has."""
    rows = await conn.fetch(
        f"SELECT {QUEUE_COLUMNS} FROM queues WHERE client_id = $1 AND name = ANY($2::text[])",
        client_id,
        names,
    )
    return {row["name"]: to_queue(row) for row in rows}


async def create_within(
    conn: Executor, *, client_id: UUID, names: list[str], cap: int, always: str | None = None
) -> dict[str, Queue]:
    """Queues the client did not have, created with defaults (queues are implicit, like Oban's) if
    all of them fit under `cap`, else none (QueueLimitReached). `always` names a queue created
    whatever the cap (`default`, which every client has). Needs a transaction (check_room)."""
    counted = [name for name in names if name != always]
    if counted:
        await check_room(conn, client_id=client_id, names=counted, cap=cap)
    return {name: await ensure(conn, client_id=client_id, name=name) for name in names}


async def ensure_many(
    conn: Executor, *, client_id: UUID, names: list[str], cap: int, always: str | None = None
) -> dict[str, Queue]:
    """The named queues, those missing created as `create_within` does. Needs a transaction."""
    found = await get_many(conn, client_id=client_id, names=names)
    missing = [name for name in dict.fromkeys(names) if name not in found]
    if missing:
        found |= await create_within(conn, client_id=client_id, names=missing, cap=cap, always=always)
    return found


async def upsert(
    conn: Executor,
    *,
    client_id: UUID,
    name: str,
    changes: dict[str, Any],
    insert_values: Mapping[str, Any] | None = None,
) -> Queue:
    """Create or change a queue; only the settings in `changes` are written to an existing one.

    `insert_values` adds settings for a new row only: PostgreSQL checks the row it would insert
    (column defaults included) before it sees the conflict, so a new min_backoff_s above the
    default max_backoff_s must bring the queue's max_backoff_s along, even for an update."""
    row = {**(insert_values or {}), **changes}
    columns = [column for column in SETTINGS if column in row]
    values = [row[column] for column in columns]
    insert_columns = ", ".join(["client_id", "name", *columns])
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 3))
    # claim_seq advances with every change: a limited or keyed claim that read the old settings
    # is not written (CLAIM_LIMITED, CLAIM_KEYED) and claims again under the new ones
    updates = ", ".join(
        [*(f"{c} = EXCLUDED.{c}" for c in columns if c in changes), "updated_at = now()",
         "claim_seq = queues.claim_seq + 1"]
    )  # fmt: skip
    rows = await conn.fetch(
        f"""
        INSERT INTO queues ({insert_columns}) VALUES ({placeholders})
        ON CONFLICT (client_id, name) DO UPDATE SET {updates}
        RETURNING {QUEUE_COLUMNS}
        """,
        client_id,
        name,
        *values,
    )
    queue = to_queue(rows[0])
    if "paused" in changes and not changes["paused"]:
        await conn.fetch("SELECT pg_notify($1, $2)", AVAILABLE_CHANNEL, str(queue.id))
    return queue


async def counts(conn: Executor, *, queue_id: int) -> tuple[dict[str, int], float | None]:
    """Tasks per status (index: tasks_queue_status) and the age of the oldest available task."""
    rows = await conn.fetch(
        """
        SELECT status, count(*) AS n FROM tasks WHERE queue_id = $1 GROUP BY status
        """,
        queue_id,
    )
    oldest = await conn.fetch(
        """
        SELECT EXTRACT(epoch FROM now() - min(run_at))::float8 AS age FROM (
            SELECT run_at FROM tasks WHERE queue_id = $1 AND status = 'available'
            ORDER BY priority, run_at LIMIT 1000
        ) head
        """,
        queue_id,
    )
    return {row["status"]: int(row["n"]) for row in rows}, oldest[0]["age"]


# Purge: the tasks of a queue that are waiting to run go (running ones finish or are cancelled).
# A task in a composition (a child, a dependency, a parent with open children) is cancelled
# instead, so the row trigger of migration 0008 tells its parent and dependents: deleted, it would
# leave them waiting for it for ever. Its row stays, for the parent's gather to read.
# One chunk of up to $2 tasks (index tasks_queue_status); the caller repeats until a chunk comes back
# short. In one statement, a large queue's purge outlasted the statement deadline, and was rolled
# back, every time. SKIP LOCKED: a task a claim is taking now runs (as one claimed a moment earlier).
PURGE = f"""
WITH doomed AS (
    SELECT id, (parent_id IS NOT NULL OR has_dependents OR children_open > 0) AS composed FROM tasks
    WHERE queue_id = $1 AND status IN ('scheduled', 'available', 'retryable')
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
cancelled AS (
    UPDATE tasks t SET {CANCELLING}, last_error = 'purged with its queue'
    WHERE t.id IN (SELECT id FROM doomed WHERE composed)
    RETURNING t.id
),
purged AS (
    DELETE FROM tasks WHERE id IN (SELECT id FROM doomed WHERE NOT composed)
    RETURNING id
),
attempts AS (DELETE FROM task_attempts WHERE task_id IN (SELECT id FROM purged)),
{notify_events("cancelled")}
SELECT (SELECT count(*) FROM purged) + (SELECT count(*) FROM cancelled) AS n, (SELECT n FROM notified) AS _n
"""


async def purge_chunk(conn: Executor, *, queue_id: int, chunk: int) -> int:
    """Remove up to `chunk` tasks of a queue that are waiting to run; how many (deleted or cancelled)."""
    rows = await conn.fetch(PURGE, queue_id, chunk)
    return int(rows[0]["n"])
