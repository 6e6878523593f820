"""Schedule storage: the schedules of each client, the due-schedule pick, and the fire ledger.

Exactly once per fire time rests on three things, all in the firing transaction: due rows are
locked (FOR UPDATE SKIP LOCKED, so two replicas never hold the same schedule), each fire is a row
of `schedule_fires` whose primary key (schedule_id, fire_time) refuses a second task for the same
time, and `next_run_at` only moves by a compare-and-set on its old value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import dacite

from app.src.api.models.schedules import Schedule
from app.src.database.tasks import Executor
from app.src.utils import json_text

SCHEDULE_COLUMNS = (
    "id, client_id, name, cron, timezone, queue, kind, payload, paused, next_run_at, last_fire_time, "
    "last_task_id, created_at, updated_at, concurrency_key"
)
EDITABLE = (
    "name",
    "cron",
    "timezone",
    "queue",
    "kind",
    "payload",
    "paused",
    "next_run_at",
    "concurrency_key",
)
_DACITE = dacite.Config(check_types=False)


class NameTaken(Exception):
    """Another schedule of this client already has the name (UNIQUE (client_id, name))."""


def to_schedule(row: Mapping[str, Any]) -> Schedule:
    return dacite.from_dict(Schedule, dict(row), config=_DACITE)


# --- the client's schedules (primary key, or schedules_client for listing) ------------------------


async def insert(
    conn: Executor,
    *,
    schedule_id: UUID,
    client_id: UUID,
    name: str,
    cron: str,
    timezone: str,
    queue: str,
    kind: str,
    payload: dict[str, Any],
    paused: bool,
    next_run_at: datetime | None,
    concurrency_key: str | None = None,
) -> Schedule:
    try:
        rows = await conn.fetch(
            f"""
            INSERT INTO schedules (id, client_id, name, cron, timezone, queue, kind, payload, paused,
                                   next_run_at, concurrency_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11)
            RETURNING {SCHEDULE_COLUMNS}
            """,
            schedule_id,
            client_id,
            name,
            cron,
            timezone,
            queue,
            kind,
            json_text.dumps(payload),
            paused,
            next_run_at,
            concurrency_key,
        )
    except asyncpg.UniqueViolationError:
        raise NameTaken(name) from None
    return to_schedule(rows[0])


async def get(conn: Executor, *, client_id: UUID, schedule_id: UUID, lock: bool = False) -> Schedule | None:
    """One schedule of this client; `lock` holds its row until the transaction ends."""
    rows = await conn.fetch(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1 AND client_id = $2"
        + (" FOR UPDATE" if lock else ""),
        schedule_id,
        client_id,
    )
    return to_schedule(rows[0]) if rows else None


async def named(conn: Executor, *, client_id: UUID, name: str) -> Schedule | None:
    """The schedule of this client with this name (UNIQUE (client_id, name))."""
    rows = await conn.fetch(
        f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE client_id = $1 AND name = $2", client_id, name
    )
    return to_schedule(rows[0]) if rows else None


async def update(
    conn: Executor, *, client_id: UUID, schedule_id: UUID, changes: dict[str, Any]
) -> Schedule | None:
    """Write the columns in `changes` (whitelisted in EDITABLE) and stamp updated_at."""
    columns = [column for column in EDITABLE if column in changes]
    values = [json_text.dumps(changes[c]) if c == "payload" else changes[c] for c in columns]
    casts = {"payload": "::jsonb"}
    assignments = [f"{c} = ${i}{casts.get(c, '')}" for i, c in enumerate(columns, start=3)]
    try:
        rows = await conn.fetch(
            f"UPDATE schedules SET {', '.join([*assignments, 'updated_at = now()'])} "
            f"WHERE id = $1 AND client_id = $2 RETURNING {SCHEDULE_COLUMNS}",
            schedule_id,
            client_id,
            *values,
        )
    except asyncpg.UniqueViolationError:
        raise NameTaken(changes.get("name", "")) from None
    return to_schedule(rows[0]) if rows else None


# The row deleted is kept as it was in deleted_schedules (primary key), in the same statement.
DELETE_SCHEDULE = f"""
WITH deleted AS (
    DELETE FROM schedules WHERE id = $1 AND client_id = $2 RETURNING *
),
kept AS (
    INSERT INTO deleted_schedules (id, client_id, schedule)
    SELECT id, client_id, to_jsonb(deleted) FROM deleted
)
SELECT {SCHEDULE_COLUMNS} FROM deleted
"""

# A schedule deleted within retention, as it was (primary key of deleted_schedules).
DELETED_SCHEDULE = f"""
SELECT {SCHEDULE_COLUMNS} FROM (
    SELECT (jsonb_populate_record(NULL::schedules, schedule)).*
    FROM deleted_schedules WHERE id = $1 AND client_id = $2
) s
"""


async def delete(conn: Executor, *, client_id: UUID, schedule_id: UUID) -> Schedule | None:
    """Delete a schedule and its fire ledger (ON DELETE CASCADE); the tasks it made stay. The
    schedule is kept as it was, for `deleted` to answer a delete sent again."""
    rows = await conn.fetch(DELETE_SCHEDULE, schedule_id, client_id)
    return to_schedule(rows[0]) if rows else None


async def deleted(conn: Executor, *, client_id: UUID, schedule_id: UUID) -> Schedule | None:
    """The schedule as `delete` deleted it, while deleted_schedules keeps it."""
    rows = await conn.fetch(DELETED_SCHEDULE, schedule_id, client_id)
    return to_schedule(rows[0]) if rows else None


# Keyset pagination over schedules_client (client_id, id): newest first, the cursor is the last id.
LIST_SCHEDULES = f"""
SELECT {SCHEDULE_COLUMNS} FROM schedules
WHERE client_id = $1 AND ($2::uuid IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3
"""


async def list_for_client(
    conn: Executor, *, client_id: UUID, before: UUID | None, limit: int
) -> list[Schedule]:
    return [to_schedule(row) for row in await conn.fetch(LIST_SCHEDULES, client_id, before, limit)]


async def now(conn: Executor) -> datetime:
    """The database clock: every replica computes fire times against the same one."""
    rows = await conn.fetch("SELECT now() AS now")
    moment: datetime = rows[0]["now"]
    return moment


# --- firing --------------------------------------------------------------------------------------

# Due schedules, locked for this transaction (index: schedules_due (next_run_at) WHERE NOT paused).
# SKIP LOCKED: a replica that finds a schedule locked leaves it to the one firing it.
LOCK_DUE = f"""
SELECT {SCHEDULE_COLUMNS}, now() AS db_now FROM schedules
WHERE NOT paused AND next_run_at <= now()
ORDER BY next_run_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""


async def lock_due(conn: Executor, *, limit: int) -> tuple[datetime | None, list[Schedule]]:
    """(the database's now, due schedules locked until the transaction ends)."""
    rows = await conn.fetch(LOCK_DUE, limit)
    if not rows:
        return None, []
    return rows[0]["db_now"], [to_schedule({k: v for k, v in row.items() if k != "db_now"}) for row in rows]


@dataclass(frozen=True, slots=True)
class FireRecord:
    schedule_id: UUID
    fire_time: datetime
    task_id: UUID
    coalesced: int


# The ledger: a fire time that already has a row (primary key (schedule_id, fire_time)) is
# skipped, and only the task ids returned here are inserted.
INSERT_FIRES = """
INSERT INTO schedule_fires (schedule_id, fire_time, task_id, coalesced)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::int[])
ON CONFLICT (schedule_id, fire_time) DO NOTHING
RETURNING task_id
"""


async def insert_fires(conn: Executor, fires: Sequence[FireRecord]) -> set[UUID]:
    """Record fires; returns the task ids of those not recorded before."""
    rows = await conn.fetch(
        INSERT_FIRES,
        [f.schedule_id for f in fires],
        [f.fire_time for f in fires],
        [f.task_id for f in fires],
        [f.coalesced for f in fires],
    )
    return {row["task_id"] for row in rows}


@dataclass(frozen=True, slots=True)
class Advance:
    schedule_id: UUID
    expected: datetime  # the next_run_at this transaction read
    next_run_at: datetime | None
    last_fire_time: datetime | None
    last_task_id: UUID | None
    pause: bool = False  # the schedule can no longer be computed: stop it


# Compare-and-set on next_run_at (primary key): a schedule whose next_run_at moved meanwhile is
# not advanced twice. The caller checks that every row matched.
ADVANCE = """
UPDATE schedules s
SET next_run_at = i.next_run_at,
    last_fire_time = COALESCE(i.last_fire_time, s.last_fire_time),
    last_task_id = COALESCE(i.last_task_id, s.last_task_id),
    paused = s.paused OR i.pause
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[], $5::uuid[], $6::bool[])
    AS i(id, expected, next_run_at, last_fire_time, last_task_id, pause)
WHERE s.id = i.id AND s.next_run_at = i.expected
RETURNING s.id
"""


async def advance(conn: Executor, advances: Sequence[Advance]) -> set[UUID]:
    rows = await conn.fetch(
        ADVANCE,
        [a.schedule_id for a in advances],
        [a.expected for a in advances],
        [a.next_run_at for a in advances],
        [a.last_fire_time for a in advances],
        [a.last_task_id for a in advances],
        [a.pause for a in advances],
    )
    return {row["id"] for row in rows}
