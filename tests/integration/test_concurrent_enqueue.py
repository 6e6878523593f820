"""Many requests at once: each caller gets its own task and its own authentication verdict.

Concurrent single enqueues share one INSERT and concurrent API-key checks one lookup
(app/src/utils/coalesce.py); none of that may show through to a caller.
"""

import asyncio

from quart.typing import TestClientProtocol as Client

from app.database import Database
from app.src.database import auth as auth_store
from tests.conftest import bearer, make_client
from tests.task_harness import fetch


async def test_concurrent_single_enqueues_each_get_their_own_stored_task(
    client: Client, db: Database, database_uri: str
) -> None:
    first, second = await make_client(db, "first"), await make_client(db, "second")
    owners = [first if i % 2 else second for i in range(200)]

    async def post(i: int) -> tuple[int, dict[str, object]]:
        response = await client.post(
            "/api/tasks",
            json={"kind": "noop", "payload": {"i": i}, "queue": f"q{i % 3}", "priority": i % 10},
            headers=bearer(owners[i].api_key),
        )
        return response.status_code, await response.get_json()

    answers = await asyncio.gather(*(post(i) for i in range(200)))

    assert [status for status, _ in answers] == [201] * 200
    assert [body["payload"] for _, body in answers] == [{"i": i} for i in range(200)]
    assert [body["queue"] for _, body in answers] == [f"q{i % 3}" for i in range(200)]
    assert [body["priority"] for _, body in answers] == [i % 10 for i in range(200)]
    assert len({body["id"] for _, body in answers}) == 200
    rows = await fetch(database_uri, "SELECT id::text, client_id, payload, queue FROM tasks")
    stored = {row["id"]: row for row in rows}
    assert len(stored) == 200
    for i, (_, body) in enumerate(answers):
        row = stored[str(body["id"])]
        assert row["client_id"] == owners[i].client_id
        assert row["queue"] == f"q{i % 3}"
        assert row["payload"] == f'{{"i": {i}}}'
    for i, (_, body) in enumerate(answers):  # and each owner reads its own task back
        read = await client.get(f"/api/tasks/{body['id']}", headers=bearer(owners[i].api_key))
        assert (await read.get_json())["payload"] == {"i": i}


async def test_concurrent_requests_with_live_revoked_disabled_and_unknown_keys(
    client: Client, db: Database, database_uri: str
) -> None:
    live = await make_client(db, "live")
    revoked = await make_client(db, "revoked")
    disabled = await make_client(db, "disabled")
    async with db.driver() as conn:
        await auth_store.revoke_key(conn, client_id=revoked.client_id, key_id=revoked.key_id)
        await auth_store.set_client_disabled(conn, client_id=disabled.client_id, disabled=True)
    # well-formed, but with a secret part no key has
    unknown = live.api_key[:-6] + ("AAAAAA" if not live.api_key.endswith("AAAAAA") else "BBBBBB")
    keys = [live.api_key, revoked.api_key, disabled.api_key, unknown] * 25

    async def post(key: str) -> int:
        response = await client.post("/api/tasks", json={"kind": "noop"}, headers=bearer(key))
        return response.status_code

    statuses = await asyncio.gather(*(post(key) for key in keys))

    assert statuses == [201, 401, 401, 401] * 25
    rows = await fetch(database_uri, "SELECT client_id FROM tasks")
    assert {row["client_id"] for row in rows} == {live.client_id}
    assert len(rows) == 25
