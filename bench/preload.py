"""Server-side bulk loading of Taskgate tasks for benchmarks (no Python objects per task)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg


async def queue(conn: asyncpg.Connection, *, name: str = "default", paused: bool = False) -> tuple[Any, int]:
    client = uuid.uuid4()
    queue_id = await conn.fetchval(
        "INSERT INTO queues (client_id, name, paused) VALUES ($1, $2, $3) RETURNING id", client, name, paused
    )
    return client, int(queue_id)


async def tasks(
    conn: asyncpg.Connection,
    *,
    client: Any,
    queue_id: int,
    n: int,
    status: str = "available",
    kind: str = "noop",
    run_at: str = "now()",
    chunk: int = 100_000,
    key: str = "NULL",
    finished_at: str = "now()",
    with_attempts: bool = False,
) -> None:
    """Insert n tasks in `status`; finished ones get finished_at, scheduled ones a future run_at.

    `key` and `finished_at` are SQL over `i` (1..n across the chunks of the series): each task's
    concurrency_key and, for finished tasks, its finish time. `with_attempts`: each finished task
    also gets its attempt record, as a completion writes it."""
    has_uuidv7 = await conn.fetchval("SELECT to_regproc('uuidv7') IS NOT NULL")
    id_expr = "uuidv7()" if has_uuidv7 else "gen_random_uuid()"
    finished = finished_at if status in ("completed", "discarded", "cancelled") else "NULL"
    attempts = 1 if finished != "NULL" else 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        insert = f"""
            INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts,
                               attempts, run_at, finished_at, concurrency_key)
            SELECT {id_expr}, $1, $2, q.name, $3, '{{}}', $4, 25, {attempts}, {run_at}, {finished}, {key}
            FROM generate_series({start} + 1, {start} + $5) g(i), (SELECT name FROM queues WHERE id = $2) q
            """
        if with_attempts and finished != "NULL":
            insert = f"""
            WITH new_tasks AS ({insert} RETURNING id, finished_at)
            INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, duration_ms)
            SELECT id, 1, finished_at, finished_at, $4, 0 FROM new_tasks
            """
        await conn.execute(
            insert,
            client,
            queue_id,
            kind,
            status,
            size,
        )


# Inside the default retention (TASK_RETENTION_DAYS, 7), so the scheduler's prune leaves it alone
HISTORY_SPAN_DAYS = 6


async def history(uri: str, n: int, *, chunk: int = 100_000) -> None:
    """A freshly migrated database holding n completed tasks with their attempt records, of a client
    and queue of their own, finished over the last HISTORY_SPAN_DAYS; vacuumed, analyzed and
    checkpointed, so the measurement after it starts on a settled table."""
    from app.src.database import migrations
    from bench.server import sqlalchemy_uri

    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    conn = await asyncpg.connect(uri)
    try:
        client, queue_id = await queue(conn, name="history")
        span_s = HISTORY_SPAN_DAYS * 86_400
        await tasks(
            conn, client=client, queue_id=queue_id, n=n, status="completed", chunk=chunk, with_attempts=True,
            finished_at=f"now() - make_interval(secs => {span_s}.0 * ({n} - i) / {n})",
        )  # fmt: skip
        await conn.execute("VACUUM ANALYZE tasks, task_attempts")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
