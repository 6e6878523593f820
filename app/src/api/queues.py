"""The queues service: settings, counts, pause/resume/purge, per client."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from app.database import Database
from app.src.api import pages
from app.src.api.engine.submit import DEFAULT_QUEUE
from app.src.api.engine.task_engine import TaskEngine
from app.src.api.errors import NotFound, TooManyQueues, Unprocessable
from app.src.api.models.tasks import Queue, QueueIn
from app.src.database import queues as store

# the column defaults of a new queue (migration 0001)
DEFAULT_MIN_BACKOFF_S = 1.0
DEFAULT_MAX_BACKOFF_S = 3600.0
PURGE_CHUNK = 1000
PURGE_MAX_PER_CALL = 100_000  # a bound on one call's work, as bulk actions have (app/src/api/bulk.py)


async def put(engine: TaskEngine, *, client_id: UUID, name: str, data: QueueIn) -> Queue:
    changes: dict[str, Any] = data.model_dump(include=data.model_fields_set)
    for field in ("max_attempts", "min_backoff_s", "max_backoff_s", "paused"):
        if field in changes and changes[field] is None:
            raise Unprocessable(
                f"{field} cannot be null.",
                errors=[{"field": f"body.{field}", "message": "cannot be null", "type": "value_error"}],
            )
    async with engine.db.driver() as conn, conn.transaction():
        # locked: the check below and the write see the same row, whatever runs alongside
        current = await store.get(conn, client_id=client_id, name=name, for_update=True)
        if current is None and name != DEFAULT_QUEUE:
            await _check_room(conn, client_id=client_id, name=name, cap=engine.rules.max_queues)
        low = changes.get("min_backoff_s", current.min_backoff_s if current else DEFAULT_MIN_BACKOFF_S)
        high = changes.get("max_backoff_s", current.max_backoff_s if current else DEFAULT_MAX_BACKOFF_S)
        if low > high:
            field = "min_backoff_s" if "min_backoff_s" in changes else "max_backoff_s"
            raise Unprocessable(
                f"min_backoff_s ({low:g}) must not exceed max_backoff_s ({high:g}).",
                errors=[
                    {
                        "field": f"body.{field}",
                        "message": "min_backoff_s exceeds max_backoff_s",
                        "type": "value_error",
                    }
                ],
            )
        try:
            queue = await store.upsert(
                conn,
                client_id=client_id,
                name=name,
                changes=changes,
                insert_values={"min_backoff_s": low, "max_backoff_s": high},
            )
        except asyncpg.CheckViolationError as exc:  # the schema's last word, should the above miss
            raise Unprocessable(f"The queue settings are inconsistent: {exc.constraint_name}.") from None
    engine.queues.remember(queue)
    return queue


async def _check_room(conn: asyncpg.Connection, *, client_id: UUID, name: str, cap: int) -> None:
    try:
        await store.check_room(conn, client_id=client_id, names=[name], cap=cap)
    except store.QueueLimitReached:
        raise TooManyQueues(
            f"This client has reached its cap of {cap} queues (CLIENT_MAX_QUEUES): its queues can "
            "be changed, but no new queue can be made.",
            errors=[{"field": "path.name", "message": f"queue {name!r} would be one more than the cap "
                     f"of {cap}", "type": "too_many_queues"}],
        ) from None  # fmt: skip


async def get(db: Database, *, client_id: UUID, name: str) -> Queue:
    async with db.driver() as conn:
        queue = await store.get(conn, client_id=client_id, name=name)
        if queue is None and name == DEFAULT_QUEUE:
            queue = await store.ensure(conn, client_id=client_id, name=name)
    if queue is None:
        raise NotFound(f"No queue {name!r}.")
    return queue


async def get_with_counts(
    db: Database, *, client_id: UUID, name: str
) -> tuple[Queue, dict[str, int], float | None]:
    queue = await get(db, client_id=client_id, name=name)
    async with db.driver() as conn:
        counts, oldest = await store.counts(conn, queue_id=queue.id)
    return queue, counts, oldest


async def list_queues(
    db: Database, *, client_id: UUID, limit: int, cursor: str | None
) -> tuple[list[Queue], str | None]:
    """A page of the client's queues in name order, and the next page's cursor."""
    after = str(pages.decode(cursor, str)[0]) if cursor else None
    async with db.driver() as conn:
        if after is None:
            await store.ensure(conn, client_id=client_id, name=DEFAULT_QUEUE)
        found = await store.list_for_client(conn, client_id=client_id, after=after, limit=limit + 1)
    return pages.page(found, limit, lambda q: (q.name,))


async def set_paused(engine: TaskEngine, *, client_id: UUID, name: str, paused: bool) -> Queue:
    await get(engine.db, client_id=client_id, name=name)
    return await put(engine, client_id=client_id, name=name, data=QueueIn(paused=paused))


async def purge(db: Database, *, client_id: UUID, name: str) -> int:
    """Delete (or, in a composition, cancel) the queue's tasks that have not started, in short
    statements of PURGE_CHUNK, at most PURGE_MAX_PER_CALL a call (call again for the rest)."""
    queue = await get(db, client_id=client_id, name=name)
    total = 0
    while total < PURGE_MAX_PER_CALL:
        chunk = min(PURGE_CHUNK, PURGE_MAX_PER_CALL - total)
        async with db.driver() as conn:
            done = await store.purge_chunk(conn, queue_id=queue.id, chunk=chunk)
        total += done
        if done < chunk:
            break
    return total
