"""Storage side of the maintenance jobs: election per period, pruning, queue depth."""

from __future__ import annotations

from typing import Any

from app.src.database.tasks import Executor

# The replica whose conditional upsert succeeds runs the job for this period; the others skip.
# (A session advisory lock would leak on a pooled connection; this needs no lock at all.)
ELECT = """
INSERT INTO maintenance_jobs AS j (name, last_started_at, started_by) VALUES ($1, now(), $3)
ON CONFLICT (name) DO UPDATE SET last_started_at = now(), started_by = $3
WHERE j.last_started_at <= now() - make_interval(secs => $2)
RETURNING name
"""


async def elect(conn: Executor, *, job: str, min_interval_s: float, replica: str) -> bool:
    return bool(await conn.fetch(ELECT, job, min_interval_s, replica))


async def succeeded(conn: Executor, *, job: str) -> None:
    await conn.fetch(
        "UPDATE maintenance_jobs SET last_succeeded_at = now(), runs = runs + 1 WHERE name = $1", job
    )


async def last_successes(conn: Executor) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT name, EXTRACT(epoch FROM now() - last_succeeded_at)::float8 AS age FROM maintenance_jobs"
    )
    return {row["name"]: row["age"] for row in rows}


# Finished tasks past retention, with their attempts, in slices so no statement holds locks for
# long (index: tasks_finished; attempts by task_attempts_task).
PRUNE_TASKS = """
WITH old AS (
    SELECT id FROM tasks
    WHERE status IN ('completed', 'discarded', 'cancelled')
      AND finished_at < now() - make_interval(secs => $1)
    ORDER BY finished_at
    LIMIT $2
),
attempts AS (DELETE FROM task_attempts WHERE task_id = ANY(ARRAY(SELECT id FROM old)))
DELETE FROM tasks WHERE id = ANY(ARRAY(SELECT id FROM old))
"""


async def prune_tasks(conn: Any, *, older_than_s: float, batch: int = 5000) -> int:
    total = 0
    while True:
        status = await conn.execute(PRUNE_TASKS, older_than_s, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total


async def prune_idempotency_keys(conn: Any, *, older_than_s: float) -> int:
    status = await conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(status.split()[-1])


async def queue_depths(conn: Executor) -> list[dict[str, Any]]:
    """Unfinished tasks per queue and status (finished ones are history, not depth)."""
    rows = await conn.fetch(
        """
        SELECT q.client_id, q.name, t.status, count(*) AS n
        FROM tasks t JOIN queues q ON q.id = t.queue_id
        WHERE t.status IN ('scheduled', 'available', 'running', 'waiting', 'retryable')
        GROUP BY q.client_id, q.name, t.status
        """
    )
    return [dict(row) for row in rows]
