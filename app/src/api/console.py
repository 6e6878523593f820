"""What the operator console reads and does across tenants.

Operators see every client's data. Reads here take `client_id: UUID | None` (None: every tenant).
Actions on one object find its tenant first and then go through the same service an API client's
request would (tasks.retry, queues.set_paused, schedules.trigger, ...), so a rule written there
holds here too. Callers are operator-only; that is checked where a request is authenticated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from app.src.api import pages, queues, schedules, tasks
from app.src.api.engine.submit import Submitter
from app.src.api.errors import NotFound
from app.src.api.models.schedules import Schedule, SchedulePatch
from app.src.api.models.tasks import Attempt, Queue, QueueIn, Task, waiting_for
from app.src.database import auth as auth_store
from app.src.database import console as store
from app.src.database import durable as durable_store
from app.src.database import workers as worker_store
from app.src.database.console import QueueStats, Series

if TYPE_CHECKING:
    from app.database import Database
    from app.src.api.engine.task_engine import TaskEngine

SERIES_MINUTES = 60


@dataclass(frozen=True, slots=True)
class QueueSummary:
    queue: Queue
    stats: QueueStats
    series: Series  # SERIES_MINUTES values, oldest first

    @property
    def completed_last_hour(self) -> int:
        return sum(self.series.completed)

    @property
    def depth(self) -> int:
        c = self.stats.counts
        return sum(c.get(s, 0) for s in ("scheduled", "available", "retryable", "waiting"))

    @property
    def purgeable(self) -> int:
        """What purge deletes: tasks that have not started (queues.purge)."""
        c = self.stats.counts
        return sum(c.get(s, 0) for s in ("scheduled", "available", "retryable"))


async def tenant_names(db: Database) -> dict[UUID, str]:
    """Display names of tenants: API clients by name (an operator's own tenant has none)."""
    async with db.driver() as conn:
        return {client.id: client.name for client in await auth_store.list_clients(conn)}


async def overview(
    db: Database, *, client_id: UUID | None, limit: int, cursor: str | None
) -> tuple[list[QueueSummary], str | None]:
    """A page of queues (by name, then client) with their figures, and the next page's cursor."""
    after = None
    if cursor:
        name, client = pages.decode(cursor, str, str)
        try:
            after = (str(name), UUID(str(client)))
        except ValueError:
            raise pages.invalid_cursor() from None
    async with db.driver() as conn:
        found, next_cursor = pages.page(
            await store.list_queues(conn, client_id=client_id, after=after, limit=limit + 1),
            limit,
            lambda q: (q.name, str(q.client_id)),
        )
        ids = [q.id for q in found]
        stats = await store.queue_stats(conn, queue_ids=ids)
        series = await store.throughput(conn, queue_ids=ids, minutes=SERIES_MINUTES)
    return [QueueSummary(q, stats[q.id], series[q.id]) for q in found], next_cursor


async def queue(db: Database, *, queue_id: int) -> QueueSummary:
    async with db.driver() as conn:
        found = await store.find_queue(conn, queue_id=queue_id)
        if found is None:
            raise NotFound(f"No queue {queue_id}.")
        stats = await store.queue_stats(conn, queue_ids=[queue_id])
        series = await store.throughput(conn, queue_ids=[queue_id], minutes=SERIES_MINUTES)
    return QueueSummary(found, stats[queue_id], series[queue_id])


async def set_queue_paused(engine: TaskEngine, *, queue_id: int, paused: bool) -> Queue:
    found = (await queue(engine.db, queue_id=queue_id)).queue
    return await queues.set_paused(engine, client_id=found.client_id, name=found.name, paused=paused)


async def set_queue_limits(engine: TaskEngine, *, queue_id: int, data: QueueIn) -> Queue:
    found = (await queue(engine.db, queue_id=queue_id)).queue
    return await queues.put(engine, client_id=found.client_id, name=found.name, data=data)


async def purge_queue(db: Database, *, queue_id: int) -> int:
    found = (await queue(db, queue_id=queue_id)).queue
    return await queues.purge(db, client_id=found.client_id, name=found.name)


async def list_tasks(
    db: Database,
    *,
    client_id: UUID | None,
    queue: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Task], str | None]:
    """Tasks newest first, keyset-paginated like GET /api/tasks (the same cursors)."""
    before = tasks.decode_cursor(cursor) if cursor else None
    async with db.driver() as conn:
        found = await store.list_tasks(
            conn, client_id=client_id, before=before, queue=queue, status=status, kind=kind, limit=limit + 1
        )
    next_cursor = tasks.encode_cursor(found[limit - 1].id) if len(found) > limit else None
    return found[:limit], next_cursor


async def task(db: Database, *, task_id: UUID) -> Task:
    async with db.driver() as conn:
        found = await store.find_task(conn, task_id=task_id)
    if found is None:
        raise NotFound(f"No task {task_id}.")
    return found


ATTEMPTS_SHOWN = 500  # the console shows a task's first attempts; the API pages through all of them


async def task_with_attempts(db: Database, *, task_id: UUID) -> tuple[Task, list[Attempt]]:
    found = await task(db, task_id=task_id)
    shown, _ = await tasks.attempts(
        db, client_id=found.client_id, task_id=task_id, limit=ATTEMPTS_SHOWN, cursor=None
    )
    return found, shown


@dataclass(frozen=True, slots=True)
class Composition:
    """What the task page shows of a composed task."""

    waiting_for: dict[str, Any] | None
    steps: list[Mapping[str, Any]]
    children: list[Mapping[str, Any]]
    children_total: int
    steps_more: bool = False  # steps follow the first page shown (GET /api/tasks/{id}/steps pages)


async def composition(db: Database, *, task: Task, children_limit: int = 200) -> Composition:
    if not task.durable:  # it stored no steps, signals or children: nothing to read
        return Composition(waiting_for(task), [], [], 0)
    async with db.driver() as conn:
        steps = await durable_store.list_steps(conn, task_id=task.id, max_bytes=tasks.STEPS_PAGE_BYTES)
        children = await durable_store.list_children(conn, parent_id=task.id, limit=children_limit + 1)
    return Composition(
        waiting_for(task), steps.items, children[:children_limit], len(children), steps_more=steps.more
    )


async def retry_task(engine: TaskEngine, *, task_id: UUID) -> Task:
    found = await task(engine.db, task_id=task_id)
    return await tasks.retry(engine, client_id=found.client_id, task_id=task_id)


async def cancel_task(db: Database, *, task_id: UUID) -> Task:
    found = await task(db, task_id=task_id)
    return await tasks.cancel(db, client_id=found.client_id, task_id=task_id)


async def list_schedules(db: Database, *, client_id: UUID | None, limit: int = 500) -> list[Schedule]:
    async with db.driver() as conn:
        return await store.list_schedules(conn, client_id=client_id, limit=limit)


async def schedule(db: Database, *, schedule_id: UUID) -> Schedule:
    async with db.driver() as conn:
        found = await store.find_schedule(conn, schedule_id=schedule_id)
    if found is None:
        raise NotFound(f"No schedule {schedule_id}.")
    return found


async def set_schedule_paused(engine: TaskEngine, *, schedule_id: UUID, paused: bool) -> Schedule:
    found = await schedule(engine.db, schedule_id=schedule_id)
    return await schedules.update(
        engine,
        client_id=found.client_id,
        schedule_id=schedule_id,
        data=SchedulePatch(paused=paused),
        allow_seconds=engine.db.settings.schedule_seconds_allowed,
    )


async def trigger_schedule(engine: TaskEngine, *, schedule_id: UUID) -> Task:
    """Fire a schedule now for its own client, within that client's quota."""
    found = await schedule(engine.db, schedule_id=schedule_id)
    async with engine.db.driver() as conn:
        client = await auth_store.get_client(conn, found.client_id)
    submitter = Submitter(found.client_id, client.max_queued_tasks if client else None)
    return await schedules.trigger(engine, submitter, schedule_id=schedule_id)


async def list_workers(db: Database, *, client_id: UUID | None) -> list[store.SeenWorker]:
    """Workers seen in the last 10 minutes, in-process and remote, of every client or one."""
    async with db.driver() as conn:
        return await store.list_workers(conn, client_id=client_id, within_s=worker_store.SEEN_WINDOW_S)
