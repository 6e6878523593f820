"""One enqueue path: a single enqueue, a batch, a schedule fire, a trigger and `TaskKind.enqueue`
all apply the same defaults, the quota and the NUL check (engine/submit.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from quart import Quart

from app.src.api import schedules
from app.src.api.engine import submit
from app.src.api.engine.submit import Submitter, TaskRequest
from app.src.api.errors import TooManyRequests, Unprocessable
from app.src.api.kinds import REGISTRY
from app.src.api.kinds.builtin import NoopPayload
from app.src.api.models.auth import SCOPES
from tests.conftest import bearer
from tests.task_harness import fetch

QUEUE = "paths"
NUL = "a\u0000b"


@pytest.fixture
async def api(serving: Any) -> Quart:
    return await serving(ROLES=["api"])


async def tenant(
    app: Quart, name: str, *, max_queued_tasks: int | None = None
) -> tuple[UUID, dict[str, str]]:
    from app.src.api.auth import clients

    _, key = await clients.create_client(
        app.extensions["taskgate"].db, name=name, scopes=SCOPES, max_queued_tasks=max_queued_tasks
    )
    return key.client_id, bearer(key.api_key)


async def schedule(app: Quart, headers: dict[str, str], name: str) -> str:
    client = app.test_client()
    created = await client.post(
        "/api/schedules",
        json={"name": name, "cron": "0 0 1 1 *", "timezone": "UTC", "task": {"queue": QUEUE, "kind": "noop"}},
        headers=headers,
    )
    assert created.status_code == 201, await created.get_json()
    return str((await created.get_json())["id"])


async def make_due(database_uri: str, schedule_id: str) -> None:
    due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    await fetch(database_uri, "UPDATE schedules SET next_run_at = $1 WHERE id = $2", due, UUID(schedule_id))


async def python_enqueue(app: Quart, client_id: UUID, payload: NoopPayload) -> Any:
    runtime = app.extensions["taskgate"]
    noop = REGISTRY.get("noop")
    assert noop is not None
    async with runtime.db.transaction() as conn:
        return await noop.enqueue(payload, db=conn, engine=runtime.engine, client_id=client_id, queue=QUEUE)


async def test_every_path_fills_in_the_same_defaults(api: Quart, clean_database: str) -> None:
    client_id, headers = await tenant(api, "defaults")
    client = api.test_client()
    put = await client.put(f"/api/queues/{QUEUE}", json={"max_attempts": 7}, headers=headers)
    assert put.status_code == 200
    engine = api.extensions["taskgate"].engine

    single = await client.post("/api/tasks", json={"queue": QUEUE, "kind": "noop"}, headers=headers)
    batch = await client.post(
        "/api/tasks/batch", json={"tasks": [{"queue": QUEUE, "kind": "noop"}]}, headers=headers
    )
    fired_schedule = await schedule(api, headers, "fired")
    await make_due(clean_database, fired_schedule)
    report = await schedules.fire_due(engine, grace_s=60)
    triggered = await client.post(
        f"/api/schedules/{await schedule(api, headers, 'manual')}/trigger", headers=headers
    )
    await python_enqueue(api, client_id, NoopPayload())

    assert (single.status_code, batch.status_code, triggered.status_code, report.on_time) == (
        201,
        201,
        201,
        1,
    )
    rows = await fetch(
        clean_database,
        "SELECT kind, priority, max_attempts, schedule IS NOT NULL AS scheduled "
        "FROM tasks WHERE client_id = $1",
        client_id,
    )
    assert len(rows) == 5  # single, batch, fire, trigger, TaskKind.enqueue
    assert {(r["kind"], r["priority"], r["max_attempts"]) for r in rows} == {("noop", 5, 7)}
    assert sum(r["scheduled"] for r in rows) == 2


async def test_every_path_applies_the_clients_quota(api: Quart, clean_database: str) -> None:
    client_id, headers = await tenant(api, "bounded", max_queued_tasks=2)
    client = api.test_client()
    engine = api.extensions["taskgate"].engine
    fired_schedule = await schedule(api, headers, "fired")
    manual_schedule = await schedule(api, headers, "manual")
    full = await client.post(
        "/api/tasks/batch", json={"tasks": [{"queue": QUEUE, "kind": "noop"}] * 2}, headers=headers
    )
    assert full.status_code == 201

    single = await client.post("/api/tasks", json={"queue": QUEUE, "kind": "noop"}, headers=headers)
    batch = await client.post(
        "/api/tasks/batch", json={"tasks": [{"queue": QUEUE, "kind": "noop"}]}, headers=headers
    )
    triggered = await client.post(f"/api/schedules/{manual_schedule}/trigger", headers=headers)
    for refused in (single, batch, triggered):
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
    await make_due(clean_database, fired_schedule)
    report = await schedules.fire_due(engine, grace_s=60)
    assert (report.on_time, report.over_quota) == (0, 1)
    with pytest.raises(TooManyRequests):
        await python_enqueue(api, client_id, NoopPayload())

    [row] = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE client_id = $1", client_id)
    assert row["n"] == 2  # only the batch that filled the quota


async def test_every_path_refuses_a_nul_character(api: Quart, clean_database: str) -> None:
    client_id, headers = await tenant(api, "careful")
    client = api.test_client()
    engine = api.extensions["taskgate"].engine
    payload = {"note": NUL}

    single = await client.post("/api/tasks", json={"kind": "noop", "payload": payload}, headers=headers)
    batch = await client.post(
        "/api/tasks/batch", json={"tasks": [{"kind": "noop", "payload": payload}]}, headers=headers
    )
    scheduled = await client.post(
        "/api/schedules",
        json={
            "name": "nul",
            "cron": "0 0 1 1 *",
            "timezone": "UTC",
            "task": {"kind": "noop", "payload": payload},
        },
        headers=headers,
    )
    # several items are looked at together first: the one that holds it is still named
    larger = await client.post(
        "/api/tasks/batch",
        json={
            "tasks": [{"kind": "noop", "payload": {"i": i}} for i in range(3)]
            + [{"kind": "noop", "payload": {NUL: 1}}]
        },
        headers=headers,
    )
    assert [r.status_code for r in (single, batch, scheduled, larger)] == [422, 422, 422, 422]
    assert [e["field"] for e in (await batch.get_json())["errors"]] == ["tasks.0.payload"]
    assert [e["field"] for e in (await larger.get_json())["errors"]] == ["tasks.3.payload"]
    # A stored schedule cannot hold a NUL (jsonb refuses it), so a fire or a trigger is checked
    # the way fire_due and trigger hand their requests to submit: prepare, with the fire's options.
    with pytest.raises(Unprocessable):
        await submit.prepare(
            engine,
            Submitter(client_id),
            [
                TaskRequest(kind="noop", payload={}, queue=QUEUE),
                TaskRequest(kind="noop", payload=payload, queue=QUEUE),
            ],
            check_contract=False,
        )
    with pytest.raises(Unprocessable):
        await python_enqueue(api, client_id, NoopPayload(note=NUL))
    [row] = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE client_id = $1", client_id)
    assert row["n"] == 0
