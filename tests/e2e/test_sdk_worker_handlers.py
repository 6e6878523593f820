"""An SDK Worker in this process against the real server over HTTPS: the handlers users write."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.database import Database
from tests.conftest import ROOT, make_client
from tests.e2e.conftest import ServerProcess
from tests.task_harness import eventually, fetch

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

pytestmark = pytest.mark.timeout(90)


def traced(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A decorator as tracing and metrics libraries write them: a plain function that returns the
    handler's coroutine (so the handler no longer looks like a coroutine function)."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Awaitable[Any]:
        return fn(*args)

    return wrapper


async def test_a_decorated_async_handler_runs(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A handler wrapped by a plain decorator was run in a thread, its coroutine taken for its
    result and never run: every attempt failed with "cannot be encoded as JSON" (and a
    "never awaited" warning) until the task was discarded."""
    issued = await make_client(db, "handlers")
    ca = str(server.data_dir / "tls" / "cert.pem")
    ran: list[int] = []
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        worker = taskgate.Worker(tg, queues=["handlers"], wait_s=1, grace_s=5)

        @worker.kind("handlers.traced")
        @traced
        async def handle(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            ran.append(ctx.attempt)
            await asyncio.sleep(0)
            return {"n": payload["n"] * 2}

        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        try:

            async def registered() -> bool:  # the worker registers its kinds as it starts
                rows = await fetch(
                    clean_database, "SELECT 1 FROM remote_kinds WHERE name = 'handlers.traced'"
                )
                return bool(rows)

            await eventually(registered, timeout=30)
            task = await tg.enqueue("handlers.traced", {"n": 21}, queue="handlers", max_attempts=2)

            async def finished() -> Any:
                rows = await fetch(
                    clean_database, "SELECT status, result, last_error FROM tasks WHERE id = $1", task.id
                )
                return rows[0] if rows[0]["status"] in ("completed", "discarded") else None

            row = await eventually(finished, timeout=30, interval=0.1)
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
    assert (row["status"], row["last_error"]) == ("completed", None)
    assert row["result"] == '{"n": 42}'
    assert ran == [1]


async def test_a_kind_deleted_while_the_worker_runs_leaves_its_other_kinds_served(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """Its client deleted one of a worker's kinds: the worker's next claim, naming it, was refused
    422 and the worker stopped, so every other kind it served went unserved until it was started
    again. It now stops claiming the deleted kind and goes on with the others."""
    issued = await make_client(db, "deleted-kind")
    ca = str(server.data_dir / "tls" / "cert.pem")
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        worker = taskgate.Worker(tg, queues=["deleted"], wait_s=1, grace_s=5)

        @worker.kind("deleted.gone")
        async def gone(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {}

        @worker.kind("deleted.kept")
        async def kept(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {"n": payload["n"]}

        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        try:

            async def registered() -> bool:
                rows = await fetch(clean_database, "SELECT count(*) AS n FROM remote_kinds")
                return bool(rows[0]["n"] == 2)

            await eventually(registered, timeout=30)
            await tg.delete_kind("deleted.gone")
            task = await tg.enqueue("deleted.kept", {"n": 7}, queue="deleted")
            done = await tg.wait(task.id, timeout_s=20)
            assert not running.done()
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
    assert (done.status, done.result) == ("completed", {"n": 7})
