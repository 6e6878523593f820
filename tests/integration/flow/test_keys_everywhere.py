"""concurrency_key wherever a task is made (single, batch, schedules) and claimed (remote workers)."""

from __future__ import annotations

from collections import Counter

from quart import Quart
from quart.typing import TestClientProtocol as Client

from app.src.api.kinds import REGISTRY
from app.src.api.kinds.builtin import NoopPayload
from app.src.api.models.auth import IssuedKey
from tests.integration.test_remote_workers import claim, complete, register
from tests.task_harness import enqueue, fetch


async def test_remote_workers_claim_under_the_same_key_limits_and_fairly(
    client: Client, auth_headers: dict[str, str]
) -> None:
    await register(client, auth_headers)
    await client.put("/api/queues/tenants", json={"key_concurrency": 1}, headers=auth_headers)
    for n, key in ((1, "a"), (1, "a"), (1, "a"), (2, "b"), (3, "c")):
        await enqueue(
            client,
            auth_headers,
            kind="reports.build",
            queue="tenants",
            concurrency_key=key,
            payload={"account_id": n},
        )
    first = (await claim(client, auth_headers, max=10))["items"]
    assert len(first) == 3  # one per key
    assert (await claim(client, auth_headers, max=10))["items"] == []
    [a_task] = [item for item in first if item["payload"] == {"account_id": 1}]  # key a's
    await complete(
        client,
        auth_headers,
        {"id": a_task["id"], "attempt": 1, "outcome": "completed", "result": {"url": "u"}},
    )
    assert len((await claim(client, auth_headers, max=10))["items"]) == 1


async def test_batch_and_schedule_templates_carry_the_key(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    response = await client.post(
        "/api/tasks/batch",
        headers=auth_headers,
        json={"tasks": [{"kind": "noop", "concurrency_key": "k1"}, {"kind": "noop"}]},
    )
    items = (await response.get_json())["items"]
    assert [i["concurrency_key"] for i in items] == ["k1", None]
    schedule = await client.post(
        "/api/schedules",
        headers=auth_headers,
        json={
            "name": "nightly",
            "cron": "0 3 * * *",
            "task": {"kind": "noop", "concurrency_key": "tenant-9"},
        },
    )
    assert schedule.status_code == 201, await schedule.get_data(as_text=True)
    body = await schedule.get_json()
    assert body["task"]["concurrency_key"] == "tenant-9"
    fired = await client.post(f"/api/schedules/{body['id']}/trigger", headers=auth_headers)
    assert (await fired.get_json())["concurrency_key"] == "tenant-9"
    keys = Counter(
        r["concurrency_key"] for r in await fetch(clean_database, "SELECT concurrency_key FROM tasks")
    )
    assert keys == {"k1": 1, None: 1, "tenant-9": 1}
    queue = await (
        await client.put(
            "/api/queues/keyed",
            json={"key_concurrency": 3, "key_rate_limit_per_s": 2.5},
            headers=auth_headers,
        )
    ).get_json()
    assert (queue["key_concurrency"], queue["key_rate_limit_per_s"]) == (3, 2.5)
    bad = await client.put("/api/queues/keyed", json={"key_concurrency": 0}, headers=auth_headers)
    assert bad.status_code == 422


async def test_a_python_enqueue_inside_a_transaction_carries_the_key(
    app: Quart, api_client: IssuedKey, clean_database: str
) -> None:
    runtime = app.extensions["taskgate"]
    noop = REGISTRY.get("noop")
    assert noop is not None
    async with runtime.db.transaction() as conn:
        task = await noop.enqueue(
            NoopPayload(),
            db=conn,
            engine=runtime.engine,
            client_id=api_client.client_id,
            concurrency_key="acct-7",
        )
    assert task.concurrency_key == "acct-7"
    rows = await fetch(clean_database, "SELECT concurrency_key FROM tasks WHERE id = $1", task.id)
    assert rows[0]["concurrency_key"] == "acct-7"
