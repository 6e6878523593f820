"""Leases of the in-process worker against a real PostgreSQL: what a heartbeat's answer acts on."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from quart import Quart

from app.database import Database
from app.src.api.engine import durable
from app.src.api.kinds import TaskContext
from app.src.database import durable as durable_store
from app.src.database import tasks as store
from app.worker import leases
from app.worker.leases import Holdings, LeaseKeeper, Running
from tests.integration.test_storage_guards import claim_one, make_task
from tests.task_harness import enqueue, eventually

Serving = Callable[..., Awaitable[Quart]]


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


async def test_a_run_claimed_while_the_suspended_run_of_its_task_winds_down_keeps_its_lease(
    serving: Serving, auth_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspension makes its task available at once; this worker may claim the next run while the
    suspended run is still returning (its connection going back to the pool, say). The suspended
    run's end then took the task out of what the worker holds (by id, whichever run was there): the
    next run was never heartbeated nor fenced, its lease expired while its handler ran, and the
    rescuer handed the task to another attempt that ran beside it."""
    app = await serving(ROLES=["api", "worker"], LEASE_SECONDS=3)
    client = app.test_client()
    worker = app.extensions["taskgate"].worker
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)  # the children wait
    real_suspend = durable.suspend
    reclaimed = asyncio.Event()

    async def slow_to_return(engine: Any, *, task_id: uuid.UUID, **kwargs: Any) -> str | None:
        status = await real_suspend(engine, task_id=task_id, **kwargs)
        ending = worker.holdings.running.get(task_id)
        # the next run is claimed (and started) before this one has returned
        await eventually(lambda: worker.holdings.running.get(task_id) not in (None, ending), timeout=10)
        reclaimed.set()
        return status

    monkeypatch.setattr(durable, "suspend", slow_to_return)
    task = await enqueue(
        client, auth_headers, kind="test.spawn_then_end",
        payload={"queue": "held", "hold_s": 6, "end": "complete"},
    )  # fmt: skip
    task_id = uuid.UUID(task["id"])
    await asyncio.wait_for(reclaimed.wait(), timeout=15)
    await asyncio.sleep(4.5)  # past the lease the claim set: only heartbeats kept it
    async with worker.db.driver() as conn:
        row = await conn.fetchrow(
            "SELECT status, attempts, lease_expires_at > now() AS leased FROM tasks WHERE id = $1", task_id
        )
    assert (row["status"], row["attempts"], row["leased"]) == ("running", 2, True)
    assert task_id in worker.holdings.running
    done = await (await client.get(f"/api/tasks/{task_id}?wait=15", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    attempts = await (await client.get(f"/api/tasks/{task_id}/attempts", headers=auth_headers)).get_json()
    assert [a["outcome"] for a in attempts["items"]] == ["suspended", "completed"]
