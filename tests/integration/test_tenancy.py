"""Tenancy matrix: every task and queue route, called with another client's object, answers 404."""

from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from tests.task_harness import enqueue

TASK_ROUTES = [
    ("GET", "/api/tasks/{id}"),
    ("GET", "/api/tasks/{id}?wait=0.1"),
    ("GET", "/api/tasks/{id}/attempts"),
    ("GET", "/api/tasks/{id}/events"),
    ("POST", "/api/tasks/{id}/cancel"),
    ("POST", "/api/tasks/{id}/retry"),
]
QUEUE_ROUTES = [
    ("GET", "/api/queues/{name}"),
    ("POST", "/api/queues/{name}/pause"),
    ("POST", "/api/queues/{name}/resume"),
    ("POST", "/api/queues/{name}/purge"),
]


@pytest.mark.parametrize(("method", "path"), TASK_ROUTES)
async def test_another_clients_task_is_404(
    client: Client, auth_headers: dict[str, str], other_client_headers: dict[str, str], method: str, path: str
) -> None:
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    response = await client.open(path.format(id=task["id"]), method=method, headers=other_client_headers)
    assert response.status_code == 404
    # indistinguishable from an id that never existed
    unknown = "01a20047-8222-700d-bc3e-3051b847dd5e"
    missing = await client.open(path.format(id=unknown), method=method, headers=other_client_headers)
    assert missing.status_code == 404
    foreign_body = (await response.get_data(as_text=True)).replace(task["id"], "ID")
    assert foreign_body == (await missing.get_data(as_text=True)).replace(unknown, "ID")
    mine = await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)
    assert (await mine.get_json())["status"] == "scheduled"  # untouched


@pytest.mark.parametrize(("method", "path"), QUEUE_ROUTES)
async def test_another_clients_queue_is_404(
    client: Client, auth_headers: dict[str, str], other_client_headers: dict[str, str], method: str, path: str
) -> None:
    await client.put("/api/queues/private", json={"max_attempts": 3}, headers=auth_headers)
    await enqueue(client, auth_headers, kind="noop", queue="private")
    response = await client.open(path.format(name="private"), method=method, headers=other_client_headers)
    assert response.status_code == 404
    mine = await (await client.get("/api/queues/private", headers=auth_headers)).get_json()
    assert (mine["paused"], mine["counts"]) == (False, {"available": 1})


async def test_lists_and_same_names_are_per_client(
    client: Client, auth_headers: dict[str, str], other_client_headers: dict[str, str]
) -> None:
    await enqueue(client, auth_headers, kind="noop", queue="shared-name")
    theirs: dict[str, Any] = await (await client.get("/api/tasks", headers=other_client_headers)).get_json()
    assert theirs["items"] == []
    # the same queue name is a different queue in the other tenant
    put = await client.put("/api/queues/shared-name", json={"paused": True}, headers=other_client_headers)
    assert put.status_code == 200
    mine = await (await client.get("/api/queues/shared-name", headers=auth_headers)).get_json()
    assert mine["paused"] is False
    names = [
        q["name"]
        for q in (await (await client.get("/api/queues", headers=other_client_headers)).get_json())["items"]
    ]
    assert sorted(names) == ["default", "shared-name"]


async def test_idempotency_keys_are_scoped_per_client(
    client: Client, auth_headers: dict[str, str], other_client_headers: dict[str, str]
) -> None:
    mine = await client.post(
        "/api/tasks", json={"kind": "noop"}, headers={**auth_headers, "Idempotency-Key": "k1"}
    )
    theirs = await client.post(
        "/api/tasks", json={"kind": "noop"}, headers={**other_client_headers, "Idempotency-Key": "k1"}
    )
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert (await mine.get_json())["id"] != (await theirs.get_json())["id"]


async def test_scopes_are_enforced(client: Client, db: Any) -> None:
    from tests.conftest import bearer, make_client

    reader = await make_client(db, "reader", scopes=("tasks:read",))
    headers = bearer(reader.api_key)
    assert (await client.get("/api/tasks", headers=headers)).status_code == 200
    denied = await client.post("/api/tasks", json={"kind": "noop"}, headers=headers)
    assert denied.status_code == 403
    assert denied.mimetype == "application/problem+json"
    assert (await client.put("/api/queues/q", json={}, headers=headers)).status_code == 403
