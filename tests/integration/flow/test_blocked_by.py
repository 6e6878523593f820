"""blocked_by names the rule that holds a task: each reason is checked against the claim itself.

For every reason: while GET /api/tasks/{id} reports it, the claim (the statements workers run)
does not take the task; once the reason is gone from the answer, the very next claim takes it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from quart import Quart

from app.database import Database
from app.src.database import tasks as task_store
from tests.integration.flow.test_keyed_claim import batch
from tests.task_harness import enqueue, eventually, fetch

WORKER = uuid.uuid4()


async def reasons(client: Any, headers: dict[str, str], task_id: str) -> list[str]:
    body = await (await client.get(f"/api/tasks/{task_id}", headers=headers)).get_json()
    return [item["reason"] for item in body["blocked_by"] or []]


async def claims(db: Database, task_id: str) -> bool:
    """One claim round as a worker runs it (unlimited queues, then each limited one): is the task taken?"""
    return uuid.UUID(task_id) in await claimed_ids(db)


async def claimed_ids(db: Database) -> set[uuid.UUID]:
    async with db.driver() as conn:
        claimed = await task_store.claim_available(conn, limit=100, lease_s=30, worker_id=WORKER, queues=None)
        for queue in await task_store.limited_queues(conn, queues=None):
            claimed += await task_store.claim_limited(
                conn, queue_id=queue.id, keyed=queue.keyed, limit=100, lease_s=30, worker_id=WORKER
            )
    return {task.id for task in claimed}


async def a_live_worker(database_uri: str) -> None:
    await fetch(
        database_uri,
        "INSERT INTO workers (id, name, remote, kinds) VALUES ($1, 'test', false, ARRAY['noop'])",
        uuid.uuid4(),
    )


async def test_a_paused_queue(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await a_live_worker(clean_database)
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="noop", queue="held")
    assert await reasons(client, auth_headers, task["id"]) == ["queue_paused"]
    assert not await claims(db, task["id"])
    await client.post("/api/queues/held/resume", headers=auth_headers)
    assert await reasons(client, auth_headers, task["id"]) == []
    assert await claims(db, task["id"])
    body = await (await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)).get_json()
    assert body["status"] == "running"
    assert body["blocked_by"] is None


async def test_a_full_key(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await a_live_worker(clean_database)
    await client.put("/api/queues/keyed", json={"key_concurrency": 1}, headers=auth_headers)
    pair = await batch(
        client, auth_headers, [{"kind": "noop", "queue": "keyed", "concurrency_key": "acme"}] * 2
    )
    taken = await claimed_ids(db)
    assert len(taken) == 1
    [first] = [task for task in pair if uuid.UUID(task["id"]) in taken]
    [second] = [task for task in pair if uuid.UUID(task["id"]) not in taken]
    assert await reasons(client, auth_headers, second["id"]) == ["key_concurrency"]
    body = await (await client.get(f"/api/tasks/{second['id']}", headers=auth_headers)).get_json()
    assert "'acme'" in body["blocked_by"][0]["detail"]
    assert "1" in body["blocked_by"][0]["detail"]
    assert not await claims(db, second["id"])
    await fetch(clean_database, "UPDATE tasks SET status = 'completed' WHERE id = $1", uuid.UUID(first["id"]))
    assert await reasons(client, auth_headers, second["id"]) == []
    assert await claims(db, second["id"])


async def test_an_empty_rate_bucket_of_the_queue_and_of_a_key(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await a_live_worker(clean_database)
    # the queue's bucket starts empty and fills at 0.5 per second: no task for the first 2 s
    await client.put("/api/queues/trickle", json={"rate_limit_per_s": 0.5}, headers=auth_headers)
    queued = await enqueue(client, auth_headers, kind="noop", queue="trickle")
    assert await reasons(client, auth_headers, queued["id"]) == ["queue_rate_limit"]
    assert not await claims(db, queued["id"])
    await eventually(lambda: _no_reasons(client, auth_headers, queued["id"]), timeout=5)
    assert await claims(db, queued["id"])
    # a key's window: one start per second
    await client.put("/api/queues/paced", json={"key_rate_limit_per_s": 1}, headers=auth_headers)
    pair = await batch(client, auth_headers, [{"kind": "noop", "queue": "paced", "concurrency_key": "k"}] * 2)
    taken = await claimed_ids(db)
    assert len(taken) == 1
    [second] = [task for task in pair if uuid.UUID(task["id"]) not in taken]
    assert await reasons(client, auth_headers, second["id"]) == ["key_rate_limit"]
    assert not await claims(db, second["id"])
    await eventually(lambda: _no_reasons(client, auth_headers, second["id"]), timeout=5)
    assert await claims(db, second["id"])


async def _no_reasons(client: Any, headers: dict[str, str], task_id: str) -> bool:
    return await reasons(client, headers, task_id) == []


async def test_a_future_run_at(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await a_live_worker(clean_database)
    task = await enqueue(client, auth_headers, kind="noop", delay_s=1.5)
    assert await reasons(client, auth_headers, task["id"]) == ["run_at"]
    assert not await claims(db, task["id"])
    await asyncio.sleep(1.6)
    assert await reasons(client, auth_headers, task["id"]) == []
    async with db.driver() as conn:
        await task_store.stage_due(conn)
    assert await claims(db, task["id"])


async def test_a_kind_no_live_worker_serves(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="noop")
    assert await reasons(client, auth_headers, task["id"]) == ["no_worker"]
    # a worker that serves other queues only, or was last seen long ago, does not count
    await fetch(
        clean_database,
        "INSERT INTO workers (id, name, remote, kinds, queues) "
        "VALUES ($1, 'other', false, ARRAY['noop'], ARRAY['reports'])",
        uuid.uuid4(),
    )
    await fetch(
        clean_database,
        "INSERT INTO workers (id, name, remote, kinds, last_seen_at) "
        "VALUES ($1, 'gone', false, ARRAY['noop'], now() - interval '1 hour')",
        uuid.uuid4(),
    )
    assert await reasons(client, auth_headers, task["id"]) == ["no_worker"]
    await a_live_worker(clean_database)
    assert await reasons(client, auth_headers, task["id"]) == []


async def test_blocked_by_reads_only_the_callers_own_task(
    app: Quart, auth_headers: dict[str, str], other_client_headers: dict[str, str]
) -> None:
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="noop")
    response = await client.get(f"/api/tasks/{task['id']}", headers=other_client_headers)
    assert response.status_code == 404


async def test_a_destination_that_is_full_or_unhealthy(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await a_live_worker(clean_database)
    await fetch(clean_database, "UPDATE workers SET kinds = ARRAY['http']")
    # one host with its circuit open, one whose adaptive limit (2) is all in flight
    await fetch(
        clean_database,
        "INSERT INTO http_hosts (host, consecutive_failures, opened_until) "
        "VALUES ('down.example:443', 9, now() + interval '1 minute')",
    )
    await fetch(
        clean_database, "INSERT INTO http_hosts (host, concurrency_limit) VALUES ('busy.example:443', 2)"
    )
    await fetch(
        clean_database,
        "INSERT INTO http_host_permits (host, slot, holder, expires_at) SELECT 'busy.example:443', s, "
        "gen_random_uuid(), now() + interval '1 minute' FROM generate_series(1, 2) s",
    )
    down = await enqueue(client, auth_headers, kind="http", payload={"url": "https://down.example/hook"})
    busy = await enqueue(client, auth_headers, kind="http", payload={"url": "https://busy.example/hook"})
    fine = await enqueue(client, auth_headers, kind="http", payload={"url": "https://fine.example/hook"})
    assert await reasons(client, auth_headers, down["id"]) == ["host_unhealthy"]
    assert await reasons(client, auth_headers, busy["id"]) == ["host_concurrency"]
    assert await reasons(client, auth_headers, fine["id"]) == []
    await fetch(clean_database, "UPDATE http_host_permits SET holder = NULL, expires_at = now()")
    assert await reasons(client, auth_headers, busy["id"]) == []
