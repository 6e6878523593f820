"""Storage side of the maintenance jobs: election per period, pruning, queue depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from app.src.database.tasks import KEY_WINDOW_S, Executor

# One row per job. The replica whose conditional upsert succeeds runs the job for this period and
# holds a lease on it while the run lasts; the others skip. The row is also the cluster's record
# of the job's health: every replica reads last_succeeded_at from it, so readiness follows the
# replica that actually runs the job. (A session advisory lock would leak on a pooled
# connection; this needs no lock beyond the row's own, held for one statement.)
# ON CONFLICT DO UPDATE re-checks its WHERE on the latest row version, so of two replicas that
# tick together exactly one is elected.
ELECT = """
WITH elected AS (
    INSERT INTO maintenance_jobs AS j (name, last_started_at, started_by, run_id, lease_expires_at)
    VALUES ($1, now(), $3, $4, now() + make_interval(secs => $5))
    ON CONFLICT (name) DO UPDATE
    SET last_started_at = now(), started_by = $3, run_id = $4,
        lease_expires_at = now() + make_interval(secs => $5)
    WHERE j.last_started_at <= now() - make_interval(secs => $2)
      AND (j.lease_expires_at IS NULL OR j.lease_expires_at < now())
    RETURNING name
)
SELECT EXISTS (SELECT 1 FROM elected) AS elected,
       (SELECT EXTRACT(epoch FROM now() - last_succeeded_at)::float8
        FROM maintenance_jobs WHERE name = $1) AS succeeded_age_s
"""


@dataclass(frozen=True, slots=True)
class Election:
    elected: bool
    succeeded_age_s: float | None  # seconds since any replica last ran the job successfully


async def elect(
    conn: Executor, *, job: str, min_interval_s: float, lease_s: float, replica: str, run_id: UUID
) -> Election:
    rows = await conn.fetch(ELECT, job, min_interval_s, replica, run_id, lease_s)
    return Election(bool(rows[0]["elected"]), rows[0]["succeeded_age_s"])


# The end of a run: its outcome, and the lease freed if this run still holds it (a run that
# outlived its lease lost it to another replica and leaves that one's lease alone).
FINISHED = """
UPDATE maintenance_jobs
SET runs = runs + 1,
    last_succeeded_at = CASE WHEN $3::text IS NULL THEN now() ELSE last_succeeded_at END,
    failures = failures + CASE WHEN $3::text IS NULL THEN 0 ELSE 1 END,
    last_failed_at = CASE WHEN $3::text IS NULL THEN last_failed_at ELSE now() END,
    last_error = COALESCE($3::text, last_error),
    lease_expires_at = CASE WHEN run_id = $2 THEN NULL ELSE lease_expires_at END
WHERE name = $1
"""


async def finished(conn: Executor, *, job: str, run_id: UUID, error: str | None) -> None:
    await conn.fetch(FINISHED, job, run_id, error)


async def renew_lease(conn: Executor, *, job: str, run_id: UUID, lease_s: float) -> bool:
    rows = await conn.fetch(
        "UPDATE maintenance_jobs SET lease_expires_at = now() + make_interval(secs => $3) "
        "WHERE name = $1 AND run_id = $2 AND lease_expires_at IS NOT NULL RETURNING name",
        job,
        run_id,
        lease_s,
    )
    return bool(rows)


async def release_lease(conn: Executor, *, job: str, run_id: UUID) -> None:
    """A run cancelled at shutdown frees the job for the next period at once."""
    await conn.fetch(
        "UPDATE maintenance_jobs SET lease_expires_at = NULL WHERE name = $1 AND run_id = $2", job, run_id
    )


# Finished tasks past retention, with their attempts, in slices so no statement holds locks for
# long (index: tasks_finished; attempts by task_attempts_task). A child stays as long as its parent
# does: the parent's next run (a later one while it waits, or a retry by hand of a finished one)
# replays its spawn, and a child no longer there would be created, and run, again. A parent's
# children go in the prune run after the one that deleted it.
# The DELETE states the rule again: a task picked as finished may be retried by hand before the
# DELETE reaches its row (it waits for the retry's lock, then reads the row again against its own
# condition only). Against the ids alone, it deleted the retried task, which had just been answered
# 200, and its attempts; only the attempts of the tasks it deleted go.
PRUNE_TASKS = """
WITH old AS (
    SELECT id FROM tasks t
    WHERE status IN ('completed', 'discarded', 'cancelled')
      AND finished_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM tasks p WHERE p.id = t.parent_id)
    ORDER BY finished_at
    LIMIT $2
),
pruned AS (
    DELETE FROM tasks t
    WHERE t.id = ANY(ARRAY(SELECT id FROM old))
      AND t.status IN ('completed', 'discarded', 'cancelled')
      AND t.finished_at < now() - make_interval(secs => $1)
    RETURNING t.id
),
attempts AS (DELETE FROM task_attempts WHERE task_id IN (SELECT id FROM pruned))
SELECT (SELECT count(*) FROM old) AS picked, (SELECT count(*) FROM pruned) AS deleted
"""


async def prune_tasks(conn: Any, *, older_than_s: float, batch: int = 5000) -> int:
    total = 0
    while True:
        row = (await conn.fetch(PRUNE_TASKS, older_than_s, batch))[0]
        total += int(row["deleted"])
        # a short pass is the last: at a steady inflow rows pass the cutoff while it runs, so a
        # pass that deletes nothing might never come (a full one whose rows were retried meanwhile
        # is not short: what follows them is read in the next pass)
        if int(row["picked"]) < batch:
            return total


async def prune_idempotency_keys(conn: Any, *, older_than_s: float) -> int:
    status = await conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(status.split()[-1])


async def prune_deleted_schedules(conn: Any, *, older_than_s: float) -> int:
    """Deleted schedules kept past retention (index: deleted_schedules_time)."""
    status = await conn.execute(
        "DELETE FROM deleted_schedules WHERE deleted_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(status.split()[-1])


# The fire ledger past retention, in slices (index: schedule_fires_time). Next fire times only move
# forward, so a pruned fire time can never be fired again.
PRUNE_SCHEDULE_FIRES = """
WITH old AS (
    SELECT schedule_id, fire_time FROM schedule_fires
    WHERE fire_time < now() - make_interval(secs => $1)
    ORDER BY fire_time
    LIMIT $2
)
DELETE FROM schedule_fires f USING old WHERE f.schedule_id = old.schedule_id AND f.fire_time = old.fire_time
"""


async def prune_schedule_fires(conn: Any, *, older_than_s: float, batch: int = 5000) -> int:
    total = 0
    while True:
        status = await conn.execute(PRUNE_SCHEDULE_FIRES, older_than_s, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total


# Flow-control state that outlived its use: key rate windows not written for a minute and for
# their queue's window (1/key_rate_limit_per_s seconds when that is longer: their starts are all
# outside it; index task_key_starts_updated), and the record of which clients called which hosts,
# past task retention.
PRUNE_KEY_WINDOWS = f"""
DELETE FROM task_key_starts s
WHERE s.updated_at < now() - interval '1 minute'
  AND NOT EXISTS (
      SELECT 1 FROM queues q
      WHERE q.id = s.queue_id AND q.key_rate_limit_per_s IS NOT NULL
        AND s.updated_at >= now() - make_interval(secs => {KEY_WINDOW_S})
  )
"""


async def prune_flow_state(conn: Any, *, older_than_s: float) -> int:
    windows = await conn.execute(PRUNE_KEY_WINDOWS)
    callers = await conn.execute(
        "DELETE FROM http_host_clients WHERE last_used_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(windows.split()[-1]) + int(callers.split()[-1])


AUTOVACUUM = """
SELECT current_setting('autovacuum')::boolean AS enabled,
       (SELECT setting::float8 FROM pg_settings WHERE name = 'autovacuum_naptime') AS naptime_s
"""


async def autovacuum_settings(conn: Executor) -> tuple[bool, float]:
    """The server's autovacuum switch and its round in seconds (readable by any role)."""
    [row] = await conn.fetch(AUTOVACUUM)
    return bool(row["enabled"]), float(row["naptime_s"])


async def queue_depths(conn: Executor) -> list[dict[str, Any]]:
    """Every queue (of every client) with its unfinished tasks per status, and the age of its
    oldest available task: a queue without tasks is one row with status NULL and n 0. Finished
    tasks are history, not depth; the scan is over the unfinished rows only (partial indexes)."""
    rows = await conn.fetch(
        """
        WITH depth AS (
            SELECT queue_id, status, count(*) AS n,
                   CASE WHEN status = 'available'
                        THEN greatest(0, EXTRACT(epoch FROM now() - min(run_at))) END AS oldest_s
            FROM tasks
            WHERE status IN ('scheduled', 'available', 'running', 'waiting', 'retryable')
            GROUP BY queue_id, status
        )
        SELECT q.name, d.status, COALESCE(d.n, 0) AS n, d.oldest_s
        FROM queues q LEFT JOIN depth d ON d.queue_id = q.id
        """
    )
    return [dict(row) for row in rows]
