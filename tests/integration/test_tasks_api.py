"""The tasks API against a real PostgreSQL: enqueue, validation, idempotency, reading, actions."""

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from quart.typing import TestClientProtocol as Client

from tests.conftest import driver_uri
from tests.task_harness import enqueue, eventually, fetch

PROBLEM = "application/problem+json"


async def test_enqueue_returns_the_task_in_spec_shape(client: Client, auth_headers: dict[str, str]) -> None:
    task = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 1}, priority=2)
    assert set(task) == {
        "id", "queue", "kind", "payload", "status", "priority", "attempts", "max_attempts",
        "run_at", "created_at", "started_at", "finished_at", "result", "last_error", "progress",
        "schedule",  # beyond SPEC: the schedule fire that made the task, null otherwise
        "concurrency_key", "blocked_by", "debounced",  # SPEC part two, flow control by key
        "waiting_for", "parent_id", "depends_on",  # SPEC part two, durable composition
    }  # fmt: skip
    assert task["schedule"] is None
    assert (task["concurrency_key"], task["blocked_by"], task["debounced"]) == (None, None, None)
    assert task["status"] == "available"
    assert task["queue"] == "default"
    assert task["priority"] == 2
    assert task["attempts"] == 0
    assert task["max_attempts"] == 25
    assert task["run_at"].endswith("Z")


async def test_deferred_tasks_are_scheduled(client: Client, auth_headers: dict[str, str]) -> None:
    later = await enqueue(client, auth_headers, kind="noop", delay_s=3600)
    assert later["status"] == "scheduled"
    at = await enqueue(client, auth_headers, kind="noop", run_at="2099-01-01T00:00:00Z")
    assert at["status"] == "scheduled"
    assert at["run_at"] == "2099-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "sleep", "payload": {"seconds": "x"}}, "payload.seconds"),
        ({"kind": "sleep", "payload": {}}, "payload.seconds"),
        ({"kind": "nope", "payload": {}}, "kind"),
        ({"kind": "noop", "priority": 12}, "body.priority"),
        ({"kind": "noop", "queue": "bad name!"}, "body.queue"),
        ({"kind": "noop", "delay_s": 1, "run_at": "2030-01-01T00:00:00Z"}, "body"),
        ({"kind": "noop", "run_at": "2030-01-01T00:00:00"}, "body.run_at"),
        # times with no UTC equivalent (years 10000 and 0): once a 500 from the database driver
        ({"kind": "noop", "run_at": "9999-12-31T23:59:59-14:00"}, "body.run_at"),
        ({"kind": "noop", "run_at": "0001-01-01T00:00:00+14:00"}, "body.run_at"),
        ({"kind": "noop", "surprise": 1}, "body.surprise"),
        ({"payload": {}}, "body.kind"),
        ({"kind": "noop", "payload": {"note": "a\u0000b"}}, "payload"),  # jsonb cannot store NUL
    ],
)
async def test_invalid_enqueue_is_422_with_field_errors_and_stores_nothing(
    client: Client, auth_headers: dict[str, str], clean_database: str, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/tasks", json=body, headers=auth_headers)
    assert response.status_code == 422
    assert response.mimetype == PROBLEM
    problem = await response.get_json()
    assert any(error["field"] == field for error in problem["errors"]), problem["errors"]
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM tasks"))[0]["n"] == 0


async def test_non_json_and_malformed_bodies(client: Client, auth_headers: dict[str, str]) -> None:
    wrong_type = await client.post("/api/tasks", data="kind=noop", headers=auth_headers)
    assert wrong_type.status_code == 415
    assert wrong_type.mimetype == PROBLEM
    malformed = await client.post(
        "/api/tasks", data="{not json", headers={**auth_headers, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.mimetype == PROBLEM


async def test_unauthenticated_requests_get_401(client: Client) -> None:
    response = await client.post("/api/tasks", json={"kind": "noop"})
    assert response.status_code == 401
    assert response.mimetype == PROBLEM
    bad = await client.get("/api/tasks", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401


async def test_batch_is_all_or_nothing(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    tasks = [{"kind": "noop", "payload": {"i": i}} for i in range(50)]
    tasks[37] = {"kind": "sleep", "payload": {"seconds": "nope"}}
    rejected = await client.post("/api/tasks/batch", json={"tasks": tasks}, headers=auth_headers)
    assert rejected.status_code == 422
    assert (await rejected.get_json())["errors"][0]["field"] == "tasks.37.payload.seconds"
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM tasks"))[0]["n"] == 0

    tasks[37] = {"kind": "noop", "queue": "other"}
    accepted = await client.post("/api/tasks/batch", json={"tasks": tasks}, headers=auth_headers)
    assert accepted.status_code == 201
    items = (await accepted.get_json())["items"]
    assert len(items) == 50
    assert items[0]["payload"] == {"i": 0}
    assert items[37]["queue"] == "other"
    too_many = await client.post(
        "/api/tasks/batch", json={"tasks": [{"kind": "noop"}] * 1001}, headers=auth_headers
    )
    assert too_many.status_code == 422


async def test_a_batch_stores_every_field_as_it_was_sent(
    client: Client, auth_headers: dict[str, str]
) -> None:
    """The batch travels to PostgreSQL as one JSON document: numbers beyond 64 bits, floats,
    text beyond ASCII, times with an offset and microseconds, and absent fields come back as sent."""
    tasks = [
        {"kind": "noop", "payload": {"n": 2**70 + 1, "f": 0.1, "s": 'żółw \u2603 "q" \\', "l": [None, {}]}},
        {"kind": "noop", "queue": "second", "run_at": "2099-01-01T01:02:03.456789+05:30", "priority": 0},
        {"kind": "noop", "delay_s": 3600.5, "max_attempts": 2, "concurrency_key": "k-ü"},
    ]
    answer = await client.post(
        "/api/tasks/batch",
        data=json.dumps({"tasks": tasks}),
        headers={**auth_headers, "Content-Type": "application/json"},
    )
    assert answer.status_code == 201, await answer.get_data(as_text=True)
    items = json.loads(await answer.get_data(as_text=True))["items"]
    for item in items:  # what the batch answered is what was stored
        stored = await client.get(f"/api/tasks/{item['id']}", headers=auth_headers)
        assert {**json.loads(await stored.get_data(as_text=True)), "blocked_by": None} == item
    first, second, third = items
    assert first["payload"] == tasks[0]["payload"]
    assert second["run_at"] == "2098-12-31T19:32:03.456789Z"
    assert (second["queue"], second["priority"], second["status"]) == ("second", 0, "scheduled")
    assert (third["max_attempts"], third["concurrency_key"], third["status"]) == (2, "k-ü", "scheduled")


async def test_idempotency_key_replays_the_original(client: Client, auth_headers: dict[str, str]) -> None:
    headers = {**auth_headers, "Idempotency-Key": "order-42"}
    body = {"kind": "noop", "payload": {"order": 42}}
    first = await client.post("/api/tasks", json=body, headers=headers)
    again = await client.post("/api/tasks", json=body, headers=headers)
    assert first.status_code == 201
    assert again.status_code == 200
    assert (await again.get_json())["id"] == (await first.get_json())["id"]
    other = await client.post("/api/tasks", json={**body, "payload": {"order": 43}}, headers=headers)
    assert other.status_code == 422
    assert (await other.get_json())["type"].endswith("idempotency-key-reused")


async def test_eight_parallel_requests_with_one_key_create_one_task(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    headers = {**auth_headers, "Idempotency-Key": '"parallel-1"'}
    responses = await asyncio.gather(
        *(client.post("/api/tasks", json={"kind": "noop"}, headers=headers) for _ in range(8))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1
    assert set(statuses) <= {200, 201, 409}
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM tasks"))[0]["n"] == 1


async def test_a_key_in_flight_gets_409(
    client: Client, auth_headers: dict[str, str], api_client: Any, clean_database: str
) -> None:
    holder = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2, 7))",
                str(api_client.client_id),
                "busy-key",
            )
            response = await client.post(
                "/api/tasks", json={"kind": "noop"}, headers={**auth_headers, "Idempotency-Key": "busy-key"}
            )
            assert response.status_code == 409
    finally:
        await holder.close()
    retried = await client.post(
        "/api/tasks", json={"kind": "noop"}, headers={**auth_headers, "Idempotency-Key": "busy-key"}
    )
    assert retried.status_code == 201


async def test_quota_answers_429_with_retry_after(serving: Any, auth_headers: dict[str, str]) -> None:
    client = (await serving(CLIENT_MAX_QUEUED_TASKS=3)).test_client()
    ok = await client.post("/api/tasks/batch", json={"tasks": [{"kind": "noop"}] * 3}, headers=auth_headers)
    assert ok.status_code == 201
    over = await client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1
    assert over.mimetype == PROBLEM


async def test_retrying_by_hand_is_held_to_the_quota_too(serving: Any, auth_headers: dict[str, str]) -> None:
    # a retry makes a finished task unfinished again: like an enqueue, it must fit the quota
    client = (await serving(CLIENT_MAX_QUEUED_TASKS=3)).test_client()
    first = await client.post(
        "/api/tasks/batch", json={"tasks": [{"kind": "noop", "run_at": "2099-01-01T00:00:00Z"}] * 3},
        headers=auth_headers,
    )  # fmt: skip
    cancelled = [task["id"] for task in (await first.get_json())["items"]]
    bulk = {"filter": {"kind": "noop"}}
    assert (
        await (await client.post("/api/tasks/bulk/cancel", json=bulk, headers=auth_headers)).get_json()
    ) == {"count": 3}
    later = {"kind": "noop", "run_at": "2099-01-01T00:00:00Z"}

    async def enqueued() -> bool:  # once the quota's cached count (2 s) sees the cancels
        return (await client.post("/api/tasks", json=later, headers=auth_headers)).status_code == 201

    await eventually(enqueued, timeout=10, interval=0.2)
    # one unfinished task, quota 3: two of the three cancelled ones fit
    retried = await client.post("/api/tasks/bulk/retry", json=bulk, headers=auth_headers)
    assert retried.status_code == 200
    assert (await retried.get_json()) == {"count": 2}
    statuses = [
        (await (await client.get(f"/api/tasks/{task_id}", headers=auth_headers)).get_json())["status"]
        for task_id in cancelled
    ]
    [still] = [task_id for task_id, status in zip(cancelled, statuses, strict=True) if status == "cancelled"]
    for over in (
        await client.post("/api/tasks/bulk/retry", json=bulk, headers=auth_headers),
        await client.post(f"/api/tasks/{still}/retry", headers=auth_headers),
    ):
        assert over.status_code == 429
        assert over.mimetype == PROBLEM
        assert int(over.headers["Retry-After"]) >= 1
    assert (await (await client.get(f"/api/tasks/{still}", headers=auth_headers)).get_json())[
        "status"
    ] == "cancelled"


async def test_get_list_and_paginate(client: Client, auth_headers: dict[str, str]) -> None:
    created = [await enqueue(client, auth_headers, kind="noop", payload={"i": i}) for i in range(7)]
    await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 1}, queue="slow")
    one = await client.get(f"/api/tasks/{created[0]['id']}", headers=auth_headers)
    assert (await one.get_json())["payload"] == {"i": 0}

    seen: list[str] = []
    cursor = None
    while True:
        query = "kind=noop&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/api/tasks?{query}", headers=auth_headers)).get_json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [t["id"] for t in reversed(created)]
    slow = await (await client.get("/api/tasks?queue=slow", headers=auth_headers)).get_json()
    assert [t["kind"] for t in slow["items"]] == ["sleep"]
    bad = await client.get("/api/tasks?status=bogus", headers=auth_headers)
    assert bad.status_code == 422
    bad_cursor = await client.get("/api/tasks?cursor=!!", headers=auth_headers)
    assert bad_cursor.status_code == 422


async def test_unknown_task_is_404(client: Client, auth_headers: dict[str, str]) -> None:
    missing = "01a20047-8222-700d-bc3e-3051b847dd5e"
    for path in (f"/api/tasks/{missing}", f"/api/tasks/{missing}/attempts", f"/api/tasks/{missing}/events"):
        response = await client.get(path, headers=auth_headers)
        assert response.status_code == 404, path
    assert (await client.get("/api/tasks/not-a-uuid", headers=auth_headers)).status_code == 404
    cancel = await client.post(f"/api/tasks/{missing}/cancel", headers=auth_headers)
    assert cancel.status_code == 404


async def test_head_of_an_event_stream_answers_with_its_headers_at_once(
    client: Client, auth_headers: dict[str, str]
) -> None:
    """A HEAD of /events was answered with the whole stream's body (dropped by the server), so it
    lasted as long as the task: here, a task no worker runs, for ever."""
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    response = await asyncio.wait_for(
        client.head(f"/api/tasks/{task['id']}/events", headers=auth_headers), timeout=5
    )
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"


async def test_cancel_and_retry(client: Client, auth_headers: dict[str, str]) -> None:
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    cancelled = await (await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)).get_json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    again = await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)
    assert again.status_code == 409
    retried = await (await client.post(f"/api/tasks/{task['id']}/retry", headers=auth_headers)).get_json()
    assert retried["status"] == "available"
    assert retried["attempts"] == 0
    not_again = await client.post(f"/api/tasks/{task['id']}/retry", headers=auth_headers)
    assert not_again.status_code == 409


async def test_wait_returns_at_the_timeout_for_an_unfinished_task(
    client: Client, auth_headers: dict[str, str]
) -> None:
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get(f"/api/tasks/{task['id']}?wait=0.5", headers=auth_headers)
    assert (await response.get_json())["status"] == "scheduled"
    assert loop.time() - started >= 0.45
    assert (await client.get(f"/api/tasks/{task['id']}?wait=61", headers=auth_headers)).status_code == 422


async def test_catalog_lists_kinds_with_schemas(client: Client, auth_headers: dict[str, str]) -> None:
    kinds = {
        k["name"]: k
        for k in (await (await client.get("/api/catalog/kinds", headers=auth_headers)).get_json())["items"]
    }
    assert {"noop", "sleep"} <= set(kinds)
    assert kinds["sleep"]["payload_schema"]["properties"]["seconds"]["type"] == "number"
    assert kinds["sleep"]["result_schema"]["properties"]["slept_s"]


async def test_a_repeat_gets_its_tasks_even_when_the_quota_is_full_or_they_are_gone(
    app: Any, auth_headers: dict[str, str]
) -> None:
    """A client whose answer was lost repeats the request: it must get the task it already has,
    not a 429 for the quota that task now fills; and a clear 409, not a 500, once it is gone."""
    from tests.integration.test_one_enqueue_path import tenant

    _, headers = await tenant(app, "small", max_queued_tasks=1)
    client = app.test_client()
    body = {"kind": "noop", "queue": "q", "delay_s": 3600}
    first = await client.post("/api/tasks", json=body, headers={**headers, "Idempotency-Key": "k1"})
    assert first.status_code == 201
    again = await client.post("/api/tasks", json=body, headers={**headers, "Idempotency-Key": "k1"})
    assert again.status_code == 200, await again.get_data(as_text=True)
    assert (await again.get_json())["id"] == (await first.get_json())["id"]
    other = await client.post("/api/tasks", json=body, headers={**headers, "Idempotency-Key": "k2"})
    assert other.status_code == 429  # a new request is still held to the quota

    # gone: a client (without a quota in the way) repeats after its queue was purged
    for path, sent in (("/api/tasks", body), ("/api/tasks/batch", {"tasks": [body]})):
        keyed = {**auth_headers, "Idempotency-Key": f"gone-{path}"}
        assert (await client.post(path, json=sent, headers=keyed)).status_code == 201
        assert (await client.post("/api/queues/q/purge", headers=auth_headers)).status_code == 200
        gone = await client.post(path, json=sent, headers=keyed)
        assert gone.status_code == 409, await gone.get_data(as_text=True)
        assert (await gone.get_json())["type"].endswith("idempotency-tasks-gone")


async def test_concurrent_enqueues_cannot_all_pass_one_quota_check(app: Any, clean_database: str) -> None:
    """The quota counts enqueues being stored, not only those stored: 30 requests at once for the
    one place left get one 201 and 29 answers 429."""
    from tests.integration.test_one_enqueue_path import tenant

    client_id, headers = await tenant(app, "bursty", max_queued_tasks=3)
    client = app.test_client()
    body = {"kind": "noop", "delay_s": 3600}
    for _ in range(2):
        assert (await client.post("/api/tasks", json=body, headers=headers)).status_code == 201
    answers = await asyncio.gather(
        *(client.post("/api/tasks", json=body, headers=headers) for _ in range(30))
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] + [429] * 29, statuses
    batches = await asyncio.gather(
        *(client.post("/api/tasks/batch", json={"tasks": [body]}, headers=headers) for _ in range(10))
    )
    assert {b.status_code for b in batches} == {429}
    stored = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE client_id = $1", client_id)
    assert stored[0]["n"] == 3


async def test_a_list_filter_the_api_does_not_take_is_a_422_not_ignored(
    client: Any, auth_headers: dict[str, str]
) -> None:
    """GET /api/tasks takes no time range: `created_after` (as bulk actions take) was ignored, so
    the answer listed every task as if it matched. A parameter it does not know is a 422 naming it."""
    await enqueue(client, auth_headers, kind="noop")
    for query in (
        "created_after=2030-01-01T00:00:00Z",
        "created_before=2020-01-01T00:00:00Z",
        "statuz=completed",
    ):
        response = await client.get(f"/api/tasks?{query}", headers=auth_headers)
        assert response.status_code == 422, (query, await response.get_data(as_text=True))
        assert response.mimetype == "application/problem+json"
        [error] = (await response.get_json())["errors"]
        assert error["field"] == f"query.{query.split('=')[0]}"
    listed = await client.get("/api/tasks?status=available&limit=10", headers=auth_headers)
    assert len((await listed.get_json())["items"]) == 1
