"""An SDK Worker in this process against the real server over HTTPS: the handlers users write."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel, ConfigDict, Field

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


class Invoice(BaseModel):
    """A payload model as APIs in camelCase write them: fields under an alias, with the types a
    JSON body holds as text (a UUID, a Decimal, a datetime, a date, bytes)."""

    model_config = ConfigDict(populate_by_name=True)

    invoice_id: UUID = Field(alias="invoiceId")
    amount: Decimal
    due_at: datetime = Field(alias="dueAt")
    issued_on: date = Field(alias="issuedOn")
    memo: bytes


class Receipt(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    receipt_url: str = Field(alias="receiptUrl")
    total: Decimal
    paid_at: datetime = Field(alias="paidAt")


async def test_models_with_aliases_round_trip_through_the_server(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A payload model whose fields have aliases was sent by field name: the server, which checks
    it against the schema registered from the same model (by alias), refused the enqueue 422
    ("invoiceId: Field required"). A handler returning a result model with aliases failed every
    attempt with "result does not match the result model" (dumped by name, read back by alias)
    until its task was discarded."""
    issued = await make_client(db, "aliases")
    ca = str(server.data_dir / "tls" / "cert.pem")
    seen: list[Invoice] = []
    invoice = Invoice(
        invoice_id=uuid4(),
        amount=Decimal("12.50"),
        due_at=datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        issued_on=date(2031, 5, 1),
        memo=b"net 30",
    )
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        worker = taskgate.Worker(tg, queues=["aliases"], wait_s=1, grace_s=5)

        @worker.kind("aliases.pay", payload=Invoice, result=Receipt, max_attempts=2)
        async def pay(ctx: taskgate.TaskContext, payload: Invoice) -> Receipt:
            seen.append(payload)
            return Receipt(receipt_url=f"https://r.example/{payload.invoice_id}", total=payload.amount,
                           paid_at=payload.due_at)  # fmt: skip

        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        try:

            async def registered() -> bool:
                rows = await fetch(clean_database, "SELECT 1 FROM remote_kinds WHERE name = 'aliases.pay'")
                return bool(rows)

            await eventually(registered, timeout=30)
            task = await tg.enqueue("aliases.pay", invoice, queue="aliases")
            done = await tg.wait(task.id, timeout_s=30)
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
    assert (done.status, done.last_error) == ("completed", None), done.last_error
    assert seen == [invoice]
    assert Receipt.model_validate(done.result) == Receipt(
        receipt_url=f"https://r.example/{invoice.invoice_id}", total=Decimal("12.50"), paid_at=invoice.due_at
    )
