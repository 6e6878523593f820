"""Leases of the in-process worker against a real PostgreSQL: what a heartbeat's answer acts on."""

import asyncio
import time
import uuid
from typing import Any

import pytest

from app.database import Database
from app.src.api.kinds import TaskContext
from app.src.database import durable as durable_store
from app.src.database import tasks as store
from app.worker import leases
from app.worker.leases import Holdings, LeaseKeeper, Running
from tests.integration.test_storage_guards import claim_one, make_task


def running(claimed: store.ClaimedTask) -> Running:
    ctx = TaskContext(
        task_id=claimed.id, attempt=claimed.attempt, max_attempts=claimed.max_attempts,
        queue=claimed.queue, kind=claimed.kind, client_id=claimed.client_id,
    )  # fmt: skip
    return Running(claimed, ctx, time.monotonic())


async def test_a_heartbeat_answer_about_an_ended_run_does_not_abandon_the_next_run_of_the_task(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat sent while attempt 1 of a task ran, whose statement ran after that attempt
    suspended (the task `available` at once) and whose answer came after this worker had claimed
    attempt 2, said the task was no longer held: attempt 2 was abandoned as 'lease lost' though
    its lease was good, its handler cancelled, and the task ran again only after that lease
    expired (retried as a lost attempt, or discarded on its last one)."""
    task_id = await make_task(db)
    worker = uuid.uuid4()
    holdings = Holdings()
    keeper = LeaseKeeper(db, holdings, worker_id=worker, lease_s=30)
    first = running(await claim_one(db, worker))
    holdings.running[task_id] = first

    statement_may_run, answer_may_return, statement_ran = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_heartbeat = store.heartbeat

    async def slow_heartbeat(conn: Any, **kwargs: Any) -> dict[uuid.UUID, bool]:
        await statement_may_run.wait()  # the statement waits (a row lock, a loaded server)
        alive = await real_heartbeat(conn, **kwargs)
        statement_ran.set()
        await answer_may_return.wait()  # and its answer is read late
        return alive

    monkeypatch.setattr(leases.task_store, "heartbeat", slow_heartbeat)
    beat = asyncio.create_task(keeper.heartbeat())
    await asyncio.sleep(0.05)  # sent while attempt 1 runs
    async with db.driver() as conn:  # attempt 1 suspends: the task is available again at once
        suspended = await durable_store.suspend(
            conn, task_id=task_id, attempt=first.claimed.attempt, worker_id=worker,
            status="available", waiting_for=None, run_at=None, new_children=0,
        )  # fmt: skip
    assert suspended is not None
    holdings.running.pop(task_id)
    statement_may_run.set()
    await statement_ran.wait()
    second = running(await claim_one(db, worker))  # this worker claims attempt 2
    assert second.claimed.attempt == first.claimed.attempt + 1
    holdings.running[task_id] = second
    answer_may_return.set()
    await beat
    assert second.abandoned is None
    async with db.driver() as conn:
        row = await conn.fetchrow("SELECT status, attempts, worker_id FROM tasks WHERE id = $1", task_id)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("running", 2, worker)
