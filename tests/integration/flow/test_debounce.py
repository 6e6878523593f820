"""Debounce on enqueue: one pending task per debounce key takes the later enqueues."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from quart import Quart

from tests.integration.test_worker_processes import Serving
from tests.task_harness import fetch


def debounced(value: str, *, period_s: float = 0.5, max_wait_s: float | None = None) -> dict[str, Any]:
    debounce: dict[str, Any] = {"key": "report-7", "period_s": period_s}
    if max_wait_s is not None:
        debounce["max_wait_s"] = max_wait_s
    return {"kind": "test.returns", "payload": {"value": value}, "debounce": debounce}


async def test_a_burst_of_100_enqueues_makes_one_task_that_runs_once_with_the_last_payload(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(ROLES=["api", "worker"], WORKER_POLL_INTERVAL_S=0.1)
    client = app.test_client()
    answers = [
        await client.post("/api/tasks", json=debounced(f"v{i}"), headers=auth_headers) for i in range(100)
    ]
    assert [a.status_code for a in answers] == [201] + [200] * 99
    bodies = [await a.get_json() for a in answers]
    assert {b["id"] for b in bodies} == {bodies[0]["id"]}
    assert [b["debounced"] for b in bodies] == [False] + [True] * 99
    assert bodies[-1]["payload"] == {"value": "v99"}
    assert bodies[-1]["status"] == "scheduled"
    done = await (await client.get(f"/api/tasks/{bodies[0]['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    assert done["attempts"] == 1
    assert done["result"] == {"value": "v99"}
    assert len(await fetch(clean_database, "SELECT id FROM tasks")) == 1
    # once it has started, the same key makes a new task
    after = await client.post("/api/tasks", json=debounced("later"), headers=auth_headers)
    assert after.status_code == 201
    assert (await after.get_json())["id"] != bodies[0]["id"]


async def test_concurrent_enqueues_with_one_key_make_one_task(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    answers = await asyncio.gather(
        *(
            client.post("/api/tasks", json=debounced(f"v{i}", period_s=30), headers=auth_headers)
            for i in range(40)
        )
    )
    assert sorted(a.status_code for a in answers) == [200] * 39 + [201]
    rows = await fetch(clean_database, "SELECT payload, status FROM tasks")
    assert len(rows) == 1
    assert rows[0]["status"] == "scheduled"


async def test_max_wait_bounds_how_far_run_at_moves(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    first = await (
        await client.post("/api/tasks", json=debounced("a", period_s=60, max_wait_s=2), headers=auth_headers)
    ).get_json()
    created = datetime.fromisoformat(first["created_at"])
    # the first enqueue is bounded too: a lone enqueue runs by first enqueue + max_wait_s
    assert abs((datetime.fromisoformat(first["run_at"]) - created).total_seconds() - 2) < 0.5
    assert first["status"] == "scheduled"
    again = await (
        await client.post("/api/tasks", json=debounced("b", period_s=60, max_wait_s=2), headers=auth_headers)
    ).get_json()
    assert again["id"] == first["id"]
    assert again["payload"] == {"value": "b"}
    assert abs((datetime.fromisoformat(again["run_at"]) - created).total_seconds() - 2) < 0.5


async def test_a_max_wait_of_zero_makes_the_first_enqueue_available_at_once(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    response = await client.post(
        "/api/tasks", json=debounced("a", period_s=60, max_wait_s=0), headers=auth_headers
    )
    task = await response.get_json()
    assert (response.status_code, task["status"]) == (201, "available")


async def test_debounce_with_a_run_at_is_refused_and_stores_nothing(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    response = await client.post("/api/tasks", json={**debounced("a"), "delay_s": 5}, headers=auth_headers)
    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/problem+json")
    bad_key = await client.post(
        "/api/tasks", json={"kind": "noop", "concurrency_key": "x" * 129}, headers=auth_headers
    )
    assert bad_key.status_code == 422
    assert await fetch(clean_database, "SELECT id FROM tasks") == []


async def test_debounce_keys_are_per_client(
    app: Quart, auth_headers: dict[str, str], other_client_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    mine = await client.post("/api/tasks", json=debounced("mine", period_s=30), headers=auth_headers)
    theirs = await client.post(
        "/api/tasks", json=debounced("theirs", period_s=30), headers=other_client_headers
    )
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert (await mine.get_json())["id"] != (await theirs.get_json())["id"]


async def test_a_debounce_key_held_by_another_kind_or_queue_is_409_and_changes_nothing(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Folded into a task of another kind, the payload would meet a contract it was never checked
    against (and the pending task would be discarded when it ran)."""
    client = app.test_client()
    first = await client.post("/api/tasks", json=debounced("first", period_s=30), headers=auth_headers)
    assert first.status_code == 201
    other_kind = {**debounced("x", period_s=30), "kind": "noop", "payload": {}}
    other_queue = {**debounced("y", period_s=30), "queue": "elsewhere"}
    for body in (other_kind, other_queue):
        refused = await client.post("/api/tasks", json=body, headers=auth_headers)
        assert refused.status_code == 409, await refused.get_data(as_text=True)
        assert refused.headers["Content-Type"].startswith("application/problem+json")
        assert [e["field"] for e in (await refused.get_json())["errors"]] == ["debounce.key"]
    batch = await client.post("/api/tasks/batch", json={"tasks": [other_kind]}, headers=auth_headers)
    assert batch.status_code == 409
    assert [e["field"] for e in (await batch.get_json())["errors"]] == ["tasks.0.debounce.key"]
    rows = await fetch(clean_database, "SELECT kind, payload->>'value' AS value FROM tasks")
    assert [(r["kind"], r["value"]) for r in rows] == [("test.returns", "first")]


async def test_a_debounced_task_cancelled_before_it_started_can_be_retried_beside_a_newer_one(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A task cancelled before it started kept its debounce key; once a newer pending task held
    that key, retrying the old one (alone or in bulk) broke the unique index: a 500, and every
    bulk retry of the dead letters failed on it."""
    client = app.test_client()
    old = await (
        await client.post("/api/tasks", json=debounced("old", period_s=30), headers=auth_headers)
    ).get_json()
    assert (await client.post(f"/api/tasks/{old['id']}/cancel", headers=auth_headers)).status_code == 200
    newer = await client.post("/api/tasks", json=debounced("newer", period_s=30), headers=auth_headers)
    assert newer.status_code == 201
    newer_id = (await newer.get_json())["id"]

    retried = await client.post(f"/api/tasks/{old['id']}/retry", headers=auth_headers)
    assert retried.status_code == 200, await retried.get_data(as_text=True)
    assert (await retried.get_json())["status"] == "available"
    # the retried task is a plain task now: later enqueues still fold into the newer one
    again = await client.post("/api/tasks", json=debounced("latest", period_s=30), headers=auth_headers)
    assert again.status_code == 200
    assert (await again.get_json())["id"] == newer_id

    assert (await client.post(f"/api/tasks/{old['id']}/cancel", headers=auth_headers)).status_code == 200
    bulk = await client.post(
        "/api/tasks/bulk/retry", json={"filter": {"status": "cancelled"}}, headers=auth_headers
    )
    assert bulk.status_code == 200, await bulk.get_data(as_text=True)
    assert (await bulk.get_json())["count"] == 1
    rows = await fetch(clean_database, "SELECT id, status FROM tasks ORDER BY id")
    assert [(str(r["id"]), r["status"]) for r in rows] == [(old["id"], "available"), (newer_id, "scheduled")]


async def test_batches_debouncing_the_same_keys_in_opposite_orders_all_succeed(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Two batches that debounce the same keys, listed in opposite orders, at once: each key's row
    is locked by the batch that reached it first, until that batch commits."""
    client = app.test_client()
    keys = [f"k{i}" for i in range(40)]

    def batch(order: list[str], value: str) -> dict[str, Any]:
        return {"tasks": [{"kind": "test.returns", "payload": {"value": value},
                           "debounce": {"key": key, "period_s": 30}} for key in order]}  # fmt: skip

    answers = await asyncio.gather(
        *(
            client.post(
                "/api/tasks/batch", json=batch(keys if i % 2 else keys[::-1], f"v{i}"), headers=auth_headers
            )
            for i in range(6)
        )
    )
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 201}, [await a.get_data(as_text=True) for a in answers]
    rows = await fetch(clean_database, "SELECT id::text, debounce_key FROM tasks")
    task_of = {r["debounce_key"]: r["id"] for r in rows}
    assert sorted(task_of) == sorted(keys)
    assert len(rows) == len(keys)
    for i, answer in enumerate(answers):  # each batch answered with the one task of each key
        order = keys if i % 2 else keys[::-1]
        assert [t["id"] for t in (await answer.get_json())["items"]] == [task_of[key] for key in order]


async def test_at_its_quota_a_client_still_debounces_into_its_pending_task(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """An enqueue that only replaces the payload of the pending task holding its debounce key adds
    no task: at the client's quota it was refused 429, so the task ran with a stale payload. One
    that would add a task is still refused."""
    client = (await serving(CLIENT_MAX_QUEUED_TASKS=1)).test_client()
    first = await client.post("/api/tasks", json=debounced("a", period_s=60), headers=auth_headers)
    assert first.status_code == 201
    again = await client.post("/api/tasks", json=debounced("b", period_s=60), headers=auth_headers)
    assert again.status_code == 200, await again.get_data(as_text=True)
    body = await again.get_json()
    assert (body["id"], body["debounced"], body["payload"]) == (
        (await first.get_json())["id"],
        True,
        {"value": "b"},
    )
    twice = {"tasks": [debounced("c", period_s=60), debounced("d", period_s=60)]}
    batch = await client.post("/api/tasks/batch", json=twice, headers=auth_headers)
    assert batch.status_code == 200, await batch.get_data(as_text=True)
    other_key = {**debounced("e", period_s=60), "debounce": {"key": "other", "period_s": 60}}
    refused = await client.post("/api/tasks", json=other_key, headers=auth_headers)
    assert refused.status_code == 429
    other_kind = {**debounced("f", period_s=60), "kind": "noop"}
    assert (await client.post("/api/tasks", json=other_kind, headers=auth_headers)).status_code == 429
    rows = await fetch(clean_database, "SELECT payload FROM tasks")
    assert [r["payload"] for r in rows] == ['{"value": "d"}']
