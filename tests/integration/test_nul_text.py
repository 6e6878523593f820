"""The NUL character, which PostgreSQL's text and jsonb cannot hold, wherever it can come from.

From a request it is a 422 that stores nothing; from outside the request (a target's response, an
exception's message, a remote worker's report) it is kept as U+FFFD, so the record survives. And a
completion the database refuses anyway never holds back the others written with it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from quart.typing import TestClientProtocol as Client

from app.database import Database
from app.src.api.state_machine import Status
from app.src.database import tasks as task_store
from app.src.database.tasks import Completion
from app.worker.completing import Completer
from app.worker.leases import Holdings
from tests.integration.test_http_kind import (
    WORKER,
    Serving,
    Target,
    attempts,
    done,
    target,  # noqa: F401  (the fixture)
)
from tests.integration.test_remote_workers import claim, complete, register
from tests.task_harness import enqueue, fetch

PROBLEM = "application/problem+json"
NUL = "a\u0000b"


def with_nul(status: int) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=b"bad \x00 bytes", content_type="text/plain")

    return handle


async def test_a_response_with_a_nul_byte_is_recorded_and_the_worker_goes_on(
    serving: Serving,
    auth_headers: dict[str, str],
    target: Target,  # noqa: F811  (the fixture imported above)
) -> None:
    target.routes["/failing"] = with_nul(500)
    target.routes["/fine"] = with_nul(200)
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/quick", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    failing = await enqueue(client, auth_headers, kind="http", queue="quick", max_attempts=2,
                            payload={"url": target.url("/failing"), "json": {}})  # fmt: skip
    fine = await enqueue(client, auth_headers, kind="http", payload={"url": target.url("/fine"), "json": {}})
    after = await enqueue(client, auth_headers, kind="noop")

    failed = await done(client, auth_headers, failing["id"])
    assert failed["status"] == "discarded"
    assert failed["last_error"].startswith("HTTP 500")
    assert "bad \ufffd bytes" in failed["last_error"]
    assert [a["outcome"] for a in await attempts(client, auth_headers, failing["id"])] == ["failed", "failed"]
    delivered = await done(client, auth_headers, fine["id"])
    assert delivered["status"] == "completed"
    assert delivered["result"]["body"] == "bad \ufffd bytes"
    assert (await done(client, auth_headers, after["id"]))["status"] == "completed"


async def test_nul_in_request_text_is_422_and_stores_nothing(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    task = await enqueue(client, auth_headers, kind="noop", delay_s=3600)
    signal = await client.post(
        f"/api/tasks/{task['id']}/signals/go", json={"data": {"x": NUL}}, headers=auth_headers
    )
    assert signal.status_code == 422
    assert signal.mimetype == PROBLEM
    assert [e["field"] for e in (await signal.get_json())["errors"]] == ["body.data"]
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM task_signals"))[0]["n"] == 0

    keyed = await client.post(
        "/api/tasks", json={"kind": "noop", "concurrency_key": NUL}, headers=auth_headers
    )
    assert keyed.status_code == 422
    assert [e["field"] for e in (await keyed.get_json())["errors"]] == ["body.concurrency_key"]

    # a text no field-level check covers: the database refuses it, the answer is still a 422
    described = await client.put(
        "/api/catalog/kinds/reports.nul",
        json={"payload_schema": {"type": "object"}, "description": NUL},
        headers=auth_headers,
    )
    assert described.status_code == 422, await described.get_data(as_text=True)
    assert described.mimetype == PROBLEM
    assert "NUL" in (await described.get_json())["detail"]
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM tasks"))[0]["n"] == 1


async def test_a_remote_worker_reporting_nul_gets_422_for_data_and_its_error_kept(
    client: Client, auth_headers: dict[str, str]
) -> None:
    await register(client, auth_headers)
    first = await enqueue(client, auth_headers, kind="reports.build", payload={"account_id": 1})
    second = await enqueue(client, auth_headers, kind="reports.build", payload={"account_id": 2})
    claimed = (await claim(client, auth_headers, max=2))["items"]
    assert {c["id"] for c in claimed} == {first["id"], second["id"]}

    progress = await client.post(
        "/api/workers/heartbeat",
        json={
            "task_ids": [first["id"]],
            "progress": {first["id"]: {"note": NUL}},
            "worker": {"name": "test-host:1"},
        },
        headers=auth_headers,
    )
    assert progress.status_code == 422
    assert progress.mimetype == PROBLEM

    answers = await complete(
        client,
        auth_headers,
        {"id": first["id"], "attempt": 1, "outcome": "permanent_failure", "error": NUL, "traceback": NUL},
        {"id": second["id"], "attempt": 1, "outcome": "completed", "result": {"url": "https://x"}},
    )
    assert [(a["accepted"], a["status"]) for a in answers] == [(True, "discarded"), (True, "completed")]
    failed = await (await client.get(f"/api/tasks/{first['id']}", headers=auth_headers)).get_json()
    assert failed["last_error"] == "a\ufffdb"


async def test_a_heartbeat_naming_a_version_with_nul_is_refused_before_any_lease_is_renewed(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    await register(client, auth_headers)
    task = await enqueue(client, auth_headers, kind="reports.build", payload={"account_id": 1})
    await claim(client, auth_headers)
    before = (await fetch(clean_database, "SELECT lease_expires_at FROM tasks"))[0]["lease_expires_at"]
    await asyncio.sleep(0.05)
    beat = await client.post(
        "/api/workers/heartbeat",
        json={"task_ids": [task["id"]], "worker": {"name": "test-host:1", "version": NUL}},
        headers=auth_headers,
    )
    assert beat.status_code == 422
    assert beat.mimetype == PROBLEM
    after = (await fetch(clean_database, "SELECT lease_expires_at FROM tasks"))[0]["lease_expires_at"]
    assert after == before  # refused, so nothing was renewed
    [field] = [e["field"] for e in (await beat.get_json())["errors"]]
    assert field == "body.worker.version"


async def test_a_completion_the_database_refuses_does_not_hold_back_the_others(db: Database) -> None:
    from tests.integration.test_storage_guards import make_task

    ids = [await make_task(db) for _ in range(5)]
    worker = uuid.uuid4()
    async with db.driver() as conn:
        claimed = await task_store.claim_available(conn, limit=5, lease_s=30, worker_id=worker, queues=None)
    assert {c.id for c in claimed} == set(ids)
    now = datetime.now(UTC)
    holdings = Holdings()
    for c in claimed:
        bad = c.id == ids[2]
        holdings.pending.append(
            Completion(
                id=c.id,
                attempt=c.attempt,
                status=Status.RETRYABLE if bad else Status.COMPLETED,
                outcome="failed" if bad else "completed",
                started_at=c.started_at,
                finished_at=now,
                error="\x00 written without the writer's clipping" if bad else None,
                retry_in_s=1 if bad else None,
            )
        )
    written: list[bool] = []
    completer = Completer(db, holdings, worker_id=worker, on_written=lambda: written.append(True))
    await completer.flush(timeout_s=5)

    assert holdings.pending == []  # nothing left to retry for ever, nothing left heartbeated
    assert written
    async with db.driver() as conn:
        rows = {r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM tasks")}
    assert rows == {i: ("running" if i == ids[2] else "completed") for i in ids}  # the rescuer's now
