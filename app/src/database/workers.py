"""Remote kinds and the workers seen: storage of what a client's own processes serve.

Claims, heartbeats and completions of remote workers use the engine's statements
(app/src/database/tasks.py); this module holds only what is particular to remote work: the kinds
a client registered, the tasks a completion refers to, and the rows of `GET /api/workers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from app.src.database.tasks import EVENTS_CHANNEL, Executor, kind_deleted_error
from app.src.utils import json_text

# --- remote kinds --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteKindRow:
    client_id: UUID
    name: str
    payload_schema: dict[str, Any]
    result_schema: dict[str, Any] | None
    description: str | None
    max_attempts: int | None
    version: int
    # a kind deleted and registered again starts again at version 1: (created_at, version) names
    # one contract for good
    created_at: datetime


_KIND_COLUMNS = (
    "client_id, name, payload_schema, result_schema, description, max_attempts, version, created_at"
)


def _kind(row: Mapping[str, Any]) -> RemoteKindRow:
    return RemoteKindRow(*(row[name] for name in RemoteKindRow.__dataclass_fields__))


# The version grows only when a contract changes, so validators compiled for it stay valid.
UPSERT_KIND = f"""
INSERT INTO remote_kinds AS k (client_id, name, payload_schema, result_schema, description, max_attempts)
VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, $6)
ON CONFLICT (client_id, name) DO UPDATE
SET payload_schema = EXCLUDED.payload_schema, result_schema = EXCLUDED.result_schema,
    description = EXCLUDED.description, max_attempts = EXCLUDED.max_attempts, updated_at = now(),
    version = k.version + CASE WHEN k.payload_schema IS DISTINCT FROM EXCLUDED.payload_schema
                                 OR k.result_schema IS DISTINCT FROM EXCLUDED.result_schema
                               THEN 1 ELSE 0 END
RETURNING {_KIND_COLUMNS}, (xmax = 0) AS created
"""


async def upsert_kind(
    conn: Executor,
    *,
    client_id: UUID,
    name: str,
    payload_schema: dict[str, Any],
    result_schema: dict[str, Any] | None,
    description: str | None,
    max_attempts: int | None,
) -> tuple[RemoteKindRow, bool]:
    rows = await conn.fetch(
        UPSERT_KIND,
        client_id,
        name,
        json_text.dumps(payload_schema),
        None if result_schema is None else json_text.dumps(result_schema),
        description,
        max_attempts,
    )
    return _kind(rows[0]), bool(rows[0]["created"])


async def list_kinds(
    conn: Executor,
    *,
    client_id: UUID,
    names: Sequence[str] | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[RemoteKindRow]:
    """A client's remote kinds in name order (primary key (client_id, name)); `after` and `limit`
    make a keyset page."""
    rows = await conn.fetch(
        f"SELECT {_KIND_COLUMNS} FROM remote_kinds WHERE client_id = $1 "
        "AND ($2::text[] IS NULL OR name = ANY($2::text[])) AND ($3::text IS NULL OR name > $3) "
        "ORDER BY name LIMIT $4",
        client_id,
        None if names is None else list(names),
        after,
        limit,
    )
    return [_kind(row) for row in rows]


# A deleted kind: the tasks of it that have not started can never run, so they end now with a
# clear error (index: tasks_client), and so do composed tasks waiting to run again (for a signal,
# their children or their dependencies: their next run could never be claimed; a parent discarded
# stops its children through the trigger of migration 0015). Running ones finish as usual, or, when
# their run ends without finishing them, are discarded then with the same error (ended_status).
DELETE_KIND = f"""
WITH deleted AS (
    DELETE FROM remote_kinds WHERE client_id = $1 AND name = $2 RETURNING name
),
discarded AS (
    UPDATE tasks SET status = 'discarded', finished_at = now(), waiting_for = NULL,
                     last_error = {kind_deleted_error("$2")}
    WHERE client_id = $1 AND kind = $2 AND status IN ('scheduled', 'available', 'retryable', 'waiting')
      AND EXISTS (SELECT 1 FROM deleted)
    RETURNING id
),
notified AS (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) AS n FROM discarded)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM discarded) AS discarded,
       (SELECT n FROM notified) AS _n
"""


async def delete_kind(conn: Executor, *, client_id: UUID, name: str) -> tuple[bool, int]:
    """(whether it existed, how many unstarted tasks were discarded)."""
    rows = await conn.fetch(DELETE_KIND, client_id, name)
    return bool(rows[0]["deleted"]), int(rows[0]["discarded"])


# --- tasks a remote completion or heartbeat names ------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldTask:
    id: UUID
    queue_id: int
    kind: str
    status: str
    attempt: int
    max_attempts: int
    started_at: datetime | None
    worker_id: UUID | None
    remote_holder: bool = False  # held by a remote worker of this client (not an in-process one)
    retry_base: int = 0  # attempts_before_retry: attempts that were no failure (outcomes.after_failure)


# A remote worker's row is written by its first claim in each process (before it claims), so a
# task one of them holds finds it (primary key of workers); in-process workers' rows have no client.
HELD_TASKS = """
SELECT t.id, t.queue_id, t.kind, t.status, t.attempts, t.max_attempts, t.started_at, t.worker_id,
       t.attempts_before_retry,
       EXISTS (SELECT 1 FROM workers w WHERE w.id = t.worker_id AND w.remote AND w.client_id = $2)
           AS remote_holder
FROM tasks t
WHERE t.id = ANY($1::uuid[]) AND t.client_id = $2
"""


async def held_tasks(conn: Executor, *, client_id: UUID, task_ids: list[UUID]) -> dict[UUID, HeldTask]:
    """The named tasks of this client as they are now (primary key); others' are not there."""
    rows = await conn.fetch(HELD_TASKS, task_ids, client_id)
    return {
        r["id"]: HeldTask(
            id=r["id"],
            queue_id=r["queue_id"],
            kind=r["kind"],
            status=r["status"],
            attempt=r["attempts"],
            max_attempts=r["max_attempts"],
            started_at=r["started_at"],
            worker_id=r["worker_id"],
            remote_holder=r["remote_holder"],
            retry_base=r["attempts_before_retry"],
        )
        for r in rows
    }


# --- workers seen --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRow:
    id: UUID
    name: str
    version: str | None
    remote: bool
    kinds: list[str]
    queues: list[str] | None
    running: int
    last_seen_at: datetime


# `running` is set when the caller knows it (a heartbeat names everything held) and otherwise
# moved by `running_delta` (a claim adds, a completion subtracts).
SEEN = """
INSERT INTO workers AS w (id, client_id, name, version, remote, kinds, queues, running)
VALUES ($1, $2, $3, $4, $5, COALESCE($6::text[], '{}'), $7::text[], GREATEST(0, COALESCE($8, $9, 0)))
ON CONFLICT (id) DO UPDATE
SET name = EXCLUDED.name,
    version = COALESCE(EXCLUDED.version, w.version),
    kinds = COALESCE($6::text[], w.kinds),
    queues = CASE WHEN $6::text[] IS NULL THEN w.queues ELSE EXCLUDED.queues END,
    running = GREATEST(0, COALESCE($8, w.running + COALESCE($9, 0))),
    last_seen_at = now()
"""


async def seen(
    conn: Executor,
    *,
    worker_id: UUID,
    client_id: UUID | None,
    name: str,
    version: str | None,
    remote: bool,
    kinds: list[str] | None = None,
    queues: list[str] | None = None,
    running: int | None = None,
    running_delta: int | None = None,
) -> None:
    """Record that a worker was seen; `kinds` None keeps the kinds and queues it had."""
    await conn.fetch(SEEN, worker_id, client_id, name, version, remote, kinds, queues, running, running_delta)


SEEN_WINDOW_S = 600.0

# An in-process worker serves every client: its recorded `running` counts them all, so a client is
# shown only its own tasks that worker runs now (index tasks_leased: the running tasks are its
# rows, as many as the workers' concurrency). A remote worker is the client's own: its record.
# Keyset pages in id order (the primary key): a worker's id never changes while its last_seen_at
# moves at every heartbeat, so a walk in that order would skip or repeat workers seen meanwhile.
LIST_WORKERS = """
SELECT w.id, w.name, w.version, w.remote, w.kinds, w.queues,
       CASE WHEN w.client_id IS NULL THEN COALESCE(mine.n, 0) ELSE w.running END AS running,
       w.last_seen_at
FROM workers w
LEFT JOIN (
    SELECT worker_id, count(*)::int AS n FROM tasks
    WHERE lease_expires_at IS NOT NULL AND status = 'running' AND client_id = $1
    GROUP BY worker_id
) mine ON mine.worker_id = w.id
WHERE w.last_seen_at > now() - make_interval(secs => $2) AND (w.client_id = $1 OR w.client_id IS NULL)
  AND ($3::uuid IS NULL OR w.id > $3)
ORDER BY w.id
LIMIT $4
"""


async def list_workers(
    conn: Executor,
    *,
    client_id: UUID,
    after: UUID | None = None,
    limit: int,
    within_s: float = SEEN_WINDOW_S,
) -> list[WorkerRow]:
    """This client's remote workers and the in-process ones (which serve every client), seen
    lately, in id order; `after` and `limit` make a keyset page."""
    rows = await conn.fetch(LIST_WORKERS, client_id, within_s, after, limit)
    return [WorkerRow(*(r[name] for name in WorkerRow.__dataclass_fields__)) for r in rows]


async def prune_workers(conn: Executor, *, older_than_s: float = 7 * 86400) -> int:
    rows = await conn.fetch(
        "WITH gone AS (DELETE FROM workers WHERE last_seen_at < now() - make_interval(secs => $1) "
        "RETURNING 1) SELECT count(*) AS n FROM gone",
        older_than_s,
    )
    return int(rows[0]["n"])
