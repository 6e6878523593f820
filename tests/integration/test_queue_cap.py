"""A client's queues are capped (CLIENT_MAX_QUEUES) and listed in keyset pages."""

import asyncio
import dataclasses
import re
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from app.database import Database
from app.src.api import schedules
from app.src.api.engine.task_engine import TaskEngine
from app.src.api.errors import TooManyQueues
from app.src.api.kinds import REGISTRY, load_kinds
from app.src.api.kinds.builtin import NoopPayload
from app.src.api.models.auth import IssuedKey, NewOperator
from tests.conftest import engine_over
from tests.integration.test_list_pages import assert_refuses_bad_pages, walk
from tests.integration.ui.test_console import logged_in
from tests.task_harness import enqueue

load_kinds()

PROBLEM = "application/problem+json"
TOO_MANY = "urn:taskgate:problem:too-many-queues"


async def queue_names(client: Client, headers: dict[str, str]) -> list[str]:
    return [q["name"] for q in await walk(client, "/api/queues", headers, limit=500)]


async def task_count(db: Database) -> int:
    async with db.driver() as conn:
        return int((await conn.fetch("SELECT count(*) AS n FROM tasks"))[0]["n"])


async def test_past_the_cap_a_new_queue_is_refused_and_nothing_is_stored(
    serving: Any, auth_headers: dict[str, str], db: Database
) -> None:
    client = (await serving(CLIENT_MAX_QUEUES=3)).test_client()
    await enqueue(client, auth_headers, kind="noop", queue="a")
    assert (
        await client.put("/api/queues/b", json={"max_attempts": 3}, headers=auth_headers)
    ).status_code == 200
    assert await queue_names(client, auth_headers) == ["a", "b", "default"]  # the cap: 3, default in it
    stored = await task_count(db)

    one = await client.post("/api/tasks", json={"kind": "noop", "queue": "c"}, headers=auth_headers)
    assert one.status_code == 409
    assert one.mimetype == PROBLEM
    body = await one.get_json()
    assert body["type"] == TOO_MANY
    assert "3" in body["detail"]
    assert [e["field"] for e in body["errors"]] == ["queue"]

    batch = {"tasks": [{"kind": "noop", "queue": "a"}, {"kind": "noop", "queue": "c"},
                       {"kind": "noop", "queue": "d"}]}  # fmt: skip
    refused = await client.post("/api/tasks/batch", json=batch, headers=auth_headers)
    assert refused.status_code == 409
    assert [e["field"] for e in (await refused.get_json())["errors"]] == ["tasks.1.queue", "tasks.2.queue"]

    put = await client.put("/api/queues/c", json={"paused": True}, headers=auth_headers)
    assert put.status_code == 409
    assert put.mimetype == PROBLEM
    assert [e["field"] for e in (await put.get_json())["errors"]] == ["path.name"]

    assert await task_count(db) == stored  # all or nothing: not even queue a's task of the batch
    assert await queue_names(client, auth_headers) == ["a", "b", "default"]
    assert (await client.get("/api/queues/c", headers=auth_headers)).status_code == 404
    # the queues it has still take tasks and changes
    await enqueue(client, auth_headers, kind="noop", queue="b")
    await enqueue(client, auth_headers, kind="noop")
    assert (
        await client.put("/api/queues/a", json={"max_attempts": 9}, headers=auth_headers)
    ).status_code == 200


async def test_concurrent_enqueues_cannot_pass_the_cap_together(
    serving: Any, auth_headers: dict[str, str]
) -> None:
    client = (await serving(CLIENT_MAX_QUEUES=3)).test_client()
    await enqueue(client, auth_headers, kind="noop")  # default: 1 of 3

    async def into(name: str) -> int:
        response = await client.post("/api/tasks", json={"kind": "noop", "queue": name}, headers=auth_headers)
        return response.status_code

    statuses = await asyncio.gather(*(into(f"q{i}") for i in range(10)))
    assert sorted(statuses) == [201] * 2 + [409] * 8
    assert len(await queue_names(client, auth_headers)) == 3


async def test_queues_come_in_pages(client: Client, auth_headers: dict[str, str]) -> None:
    for name in ("e", "c", "a", "d", "b"):
        await enqueue(client, auth_headers, kind="noop", queue=name)
    one_page = await (await client.get("/api/queues", headers=auth_headers)).get_json()
    assert [q["name"] for q in one_page["items"]] == ["a", "b", "c", "d", "default", "e"]
    assert "next_cursor" not in one_page  # the last page: as {items} read before pages
    assert [q["name"] for q in await walk(client, "/api/queues", auth_headers, limit=2)] == [
        "a", "b", "c", "d", "default", "e"
    ]  # fmt: skip
    await assert_refuses_bad_pages(client, "/api/queues", auth_headers)


async def test_the_console_overview_pages_queues(
    app: Any, db: Database, operator: NewOperator, api_client: IssuedKey
) -> None:
    async with db.driver() as conn:
        await conn.fetch(
            "INSERT INTO queues (client_id, name) SELECT $1, 'q' || lpad(g::text, 3, '0') "
            "FROM generate_series(1, 150) g",
            api_client.client_id,
        )
    browser = await logged_in(app, db, operator)
    first = await (await browser.get("/ui/")).get_data(as_text=True)
    assert "q001" in first
    assert "q099" in first
    assert "q150" not in first
    link = re.search(r'href="(\?[^"]*cursor=[^"]+)" rel="next"', first)
    assert link, first
    second = await (await browser.get("/ui/" + link.group(1).replace("&amp;", "&"))).get_data(as_text=True)
    assert "q150" in second
    assert "q099" not in second


async def test_a_schedule_into_a_new_queue_past_the_cap_is_refused_and_nothing_is_stored(
    serving: Any, auth_headers: dict[str, str], db: Database
) -> None:
    client = (await serving(CLIENT_MAX_QUEUES=2)).test_client()
    await queue_names(client, auth_headers)  # `default`: 1 of 2

    def schedule(name: str, queue: str) -> dict[str, Any]:
        return {"name": name, "cron": "* * * * *", "task": {"kind": "noop", "queue": queue}}

    async def schedule_rows() -> list[tuple[str, str]]:
        async with db.driver() as conn:
            rows = await conn.fetch("SELECT name, queue FROM schedules ORDER BY name")
        return [(row["name"], row["queue"]) for row in rows]

    made = await client.post("/api/schedules", json=schedule("into-a", "a"), headers=auth_headers)
    assert made.status_code == 201  # its queue is made with it: its fires have their place
    assert await queue_names(client, auth_headers) == ["a", "default"]
    schedule_id = (await made.get_json())["id"]

    refused = await client.post("/api/schedules", json=schedule("into-b", "b"), headers=auth_headers)
    assert refused.status_code == 409
    assert refused.mimetype == PROBLEM
    body = await refused.get_json()
    assert body["type"] == TOO_MANY
    assert [e["field"] for e in body["errors"]] == ["body.task.queue"]

    patched = await client.patch(
        f"/api/schedules/{schedule_id}", json={"task": {"kind": "noop", "queue": "b"}}, headers=auth_headers
    )
    assert patched.status_code == 409
    assert (await patched.get_json())["type"] == TOO_MANY
    assert [e["field"] for e in (await patched.get_json())["errors"]] == ["body.task.queue"]

    assert await schedule_rows() == [("into-a", "a")]  # changing nothing
    assert await queue_names(client, auth_headers) == ["a", "default"]
    # queues it has still take schedules and changes
    assert (
        await client.post("/api/schedules", json=schedule("into-default", "default"), headers=auth_headers)
    ).status_code == 201
    assert (
        await client.patch(
            f"/api/schedules/{schedule_id}",
            json={"task": {"kind": "noop", "queue": "default"}},
            headers=auth_headers,
        )
    ).status_code == 200
    assert await schedule_rows() == [("into-a", "default"), ("into-default", "default")]


async def test_a_schedule_firing_into_a_new_queue_past_the_cap_is_skipped_and_the_others_fire(
    serving: Any, auth_headers: dict[str, str], db: Database
) -> None:
    client = (await serving(CLIENT_MAX_QUEUES=1)).test_client()
    await queue_names(client, auth_headers)  # `default`: the one queue the cap allows
    for name in ("into-default", "into-new"):
        body = {"name": name, "cron": "* * * * *", "task": {"kind": "noop"}}
        assert (await client.post("/api/schedules", json=body, headers=auth_headers)).status_code == 201
    async with db.driver() as conn:
        # a schedule stored before creations were held to the cap, into a queue it never made
        await conn.fetch("UPDATE schedules SET queue = 'new' WHERE name = 'into-new'")
        await conn.fetch("UPDATE schedules SET next_run_at = now() - interval '1 second'")
    engine = TaskEngine(db, dataclasses.replace(engine_over(db).rules, max_queues=1))
    report = await schedules.fire_due(engine, grace_s=60)  # one refusal must not fail the others
    assert report.schedules == 2
    async with db.driver() as conn:
        made = await conn.fetch("SELECT queue_id FROM tasks")
    assert len(made) == 1
    assert await queue_names(client, auth_headers) == ["default"]


async def test_enqueue_from_python_is_held_to_the_cap_too(db: Database, api_client: IssuedKey) -> None:
    # TaskKind.enqueue(db=...) makes its queue in the caller's transaction: the same cap applies
    noop = REGISTRY.get("noop")
    assert noop is not None
    engine = TaskEngine(db, dataclasses.replace(engine_over(db).rules, max_queues=2))
    async with db.transaction() as conn:
        await noop.enqueue(NoopPayload(), db=conn, client_id=api_client.client_id, engine=engine)
        await noop.enqueue(NoopPayload(), db=conn, client_id=api_client.client_id, engine=engine, queue="one")
    with pytest.raises(TooManyQueues):
        async with db.transaction() as conn:
            await noop.enqueue(
                NoopPayload(), db=conn, client_id=api_client.client_id, engine=engine, queue="two"
            )
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 2
        assert await conn.fetchval("SELECT count(*) FROM queues WHERE name = 'two'") == 0
