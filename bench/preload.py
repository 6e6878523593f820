"""Server-side bulk loading of Taskgate tasks for benchmarks (no Python objects per task)."""

from __future__ import annotations

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
) -> None:
    """Insert n tasks in `status`; finished ones get finished_at, scheduled ones a future run_at.

    `key` is the SQL of each task's concurrency_key, over `i` (1..n within a chunk of the series)."""
    has_uuidv7 = await conn.fetchval("SELECT to_regproc('uuidv7') IS NOT NULL")
    id_expr = "uuidv7()" if has_uuidv7 else "gen_random_uuid()"
    finished = "now()" if status in ("completed", "discarded", "cancelled") else "NULL"
    attempts = 1 if finished != "NULL" else 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        await conn.execute(
            f"""
            INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts,
                               attempts, run_at, finished_at, concurrency_key)
            SELECT {id_expr}, $1, $2, q.name, $3, '{{}}', $4, 25, {attempts}, {run_at}, {finished}, {key}
            FROM generate_series({start} + 1, {start} + $5) g(i), (SELECT name FROM queues WHERE id = $2) q
            """,
            client,
            queue_id,
            kind,
            status,
            size,
        )
