"""The queues service: settings, counts, pause/resume/purge, per client."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from app.database import Database
from app.src.api.engine.task_engine import TaskEngine
from app.src.api.errors import NotFound, Unprocessable
from app.src.api.models.tasks import Queue, QueueIn
from app.src.database import queues as store

DEFAULT_QUEUE = "default"


async def put(engine: TaskEngine, *, client_id: UUID, name: str, data: QueueIn) -> Queue:
    changes: dict[str, Any] = data.model_dump(include=data.model_fields_set)
    for field in ("max_attempts", "min_backoff_s", "max_backoff_s", "paused"):
        if field in changes and changes[field] is None:
            raise Unprocessable(
                f"{field} cannot be null.",
                errors=[{"field": f"body.{field}", "message": "cannot be null", "type": "value_error"}],
            )
    async with engine.db.driver() as conn, conn.transaction():
        current = await store.get(conn, client_id=client_id, name=name)
        low = changes.get("min_backoff_s", current.min_backoff_s if current else 1.0)
        high = changes.get("max_backoff_s", current.max_backoff_s if current else 3600.0)
        if low > high:
            raise Unprocessable(
                "min_backoff_s must not exceed max_backoff_s.",
                errors=[
                    {"field": "body.min_backoff_s", "message": "exceeds max_backoff_s", "type": "value_error"}
                ],
            )
        queue = await store.upsert(conn, client_id=client_id, name=name, changes=changes)
    engine.queues.remember(queue)
    return queue


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


async def list_queues(db: Database, *, client_id: UUID) -> list[Queue]:
    async with db.driver() as conn:
        await store.ensure(conn, client_id=client_id, name=DEFAULT_QUEUE)
        return await store.list_for_client(conn, client_id=client_id)


async def set_paused(engine: TaskEngine, *, client_id: UUID, name: str, paused: bool) -> Queue:
    await get(engine.db, client_id=client_id, name=name)
    return await put(engine, client_id=client_id, name=name, data=QueueIn(paused=paused))


async def purge(db: Database, *, client_id: UUID, name: str) -> int:
    queue = await get(db, client_id=client_id, name=name)
    async with db.driver() as conn:
        return await store.purge(conn, queue_id=queue.id)
