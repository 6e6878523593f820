"""Bulk retry and cancel by filter: one bounded statement per chunk, tenant-aware.

A filter without a client reaches every tenant, so only operator callers pass one without
(`client_id=None`); API callers always pass their own. Each chunk is its own short transaction
(rows locked with SKIP LOCKED, then one guarded UPDATE), so a million matches never hold one long
lock, and a task a worker holds is left for the next call rather than waited for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from app.src.api.engine.submit import Submitter, check_quota
from app.src.api.state_machine import Status, sources
from app.src.database import console as store
from app.src.database.console import TaskFilter

if TYPE_CHECKING:
    from app.database import Database
    from app.src.api.engine.task_engine import TaskEngine

log = structlog.get_logger("taskgate.bulk")

CHUNK = 1000
MAX_PER_CALL = 100_000  # a bound on one call's work; the caller may call again for the rest
RETRY_FROM = [s for s in sources(Status.AVAILABLE) if s in (Status.DISCARDED, Status.CANCELLED)]
CANCEL_FROM = sources(Status.CANCELLED)

__all__ = ["CANCEL_FROM", "RETRY_FROM", "TaskFilter", "cancel", "count", "retry"]


async def count(db: Database, *, where: TaskFilter, action: str) -> int:
    """How many tasks `retry` or `cancel` would reach now (the confirmation names it)."""
    statuses = RETRY_FROM if action == "retry" else CANCEL_FROM
    async with db.driver() as conn:
        return await store.count_matching(conn, where, statuses=statuses, retry=action == "retry")


async def retry(
    engine: TaskEngine, *, where: TaskFilter, limit: int = MAX_PER_CALL, submitter: Submitter | None = None
) -> int:
    """Discarded or cancelled tasks matching `where` run again from attempt one; returns how many.

    A tenant's own call (`submitter`, whose client `where` names) retries at most what its quota of
    unfinished tasks has room for (429 when it has none), as an enqueue would; an operator's (None)
    is not held to it."""
    reserved = 0
    if submitter is not None:
        unfinished = await engine.quotas.unfinished(submitter.client_id)
        check_quota(engine.rules, submitter, unfinished=unfinished, adding=1)
        room = (submitter.max_queued_tasks or engine.rules.default_max_queued_tasks) - unfinished
        limit = reserved = min(limit, room)
        engine.quotas.reserve(submitter.client_id, reserved)  # concurrent enqueues see it taken
    total = 0
    try:
        while total < limit:
            chunk = min(CHUNK, limit - total)
            async with engine.db.driver() as conn, conn.transaction():
                per_tenant = await store.bulk_retry_chunk(conn, where, from_statuses=RETRY_FROM, chunk=chunk)
            for client_id, n in per_tenant.items():
                engine.quotas.added(client_id, n)
            done = sum(per_tenant.values())
            total += done
            if done < chunk:
                break
    finally:
        if submitter is not None:
            engine.quotas.release(submitter.client_id, reserved)
    log.info("tasks.bulk.retry", count=total, client_id=str(where.client_id) if where.client_id else None)
    return total


async def cancel(db: Database, *, where: TaskFilter, limit: int = MAX_PER_CALL) -> int:
    """Unfinished tasks matching `where` are cancelled (running ones are asked to stop)."""
    total = 0
    while total < limit:
        chunk = min(CHUNK, limit - total)
        async with db.driver() as conn, conn.transaction():
            per_tenant = await store.bulk_cancel_chunk(conn, where, from_statuses=CANCEL_FROM, chunk=chunk)
        done = sum(per_tenant.values())
        total += done
        if done < chunk:
            break
    log.info("tasks.bulk.cancel", count=total, client_id=str(where.client_id) if where.client_id else None)
    return total
