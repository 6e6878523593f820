"""The queues API: settings with partial updates, counts, pause/resume, purge, validation."""

from typing import Any

from quart.typing import TestClientProtocol as Client

from tests.task_harness import enqueue, fetch


async def test_default_queue_exists_for_every_client(client: Client, auth_headers: dict[str, str]) -> None:
    listing = await (await client.get("/api/queues", headers=auth_headers)).get_json()
    assert [q["name"] for q in listing["items"]] == ["default"]
    default = await (await client.get("/api/queues/default", headers=auth_headers)).get_json()
    assert default["counts"] == {}
    assert default["oldest_available_age_s"] is None


async def test_put_creates_then_changes_only_what_is_sent(
    client: Client, auth_headers: dict[str, str]
) -> None:
    created = await client.put(
        "/api/queues/emails",
        json={"max_concurrency": 4, "rate_limit_per_s": 10, "max_attempts": 5},
        headers=auth_headers,
    )
    assert created.status_code == 200
    changed = await (
        await client.put("/api/queues/emails", json={"max_attempts": 7}, headers=auth_headers)
    ).get_json()
    assert (changed["max_concurrency"], changed["rate_limit_per_s"], changed["max_attempts"]) == (4, 10, 7)
    lifted = await (
        await client.put("/api/queues/emails", json={"max_concurrency": None}, headers=auth_headers)
    ).get_json()
    assert lifted["max_concurrency"] is None
    task = await enqueue(client, auth_headers, kind="noop", queue="emails")
    assert task["max_attempts"] == 7  # new tasks take the queue's default


async def test_invalid_queue_settings_are_422(client: Client, auth_headers: dict[str, str]) -> None:
    for body in (
        {"max_concurrency": 0},
        {"rate_limit_per_s": -1},
        {"min_backoff_s": 10, "max_backoff_s": 1},
        {"paused": None},
        {"unknown": 1},
    ):
        response = await client.put("/api/queues/q1", json=body, headers=auth_headers)
        assert response.status_code == 422, body
        assert response.mimetype == "application/problem+json"
    bad_name = await client.put("/api/queues/" + "x" * 65, json={}, headers=auth_headers)
    assert bad_name.status_code in (404, 422)
    assert (await client.put("/api/queues/-bad", json={}, headers=auth_headers)).status_code == 422


async def test_counts_pause_resume_and_purge(client: Client, auth_headers: dict[str, str]) -> None:
    for _ in range(3):
        await enqueue(client, auth_headers, kind="noop", queue="work")
    await enqueue(client, auth_headers, kind="noop", queue="work", delay_s=600)
    queue = await (await client.get("/api/queues/work", headers=auth_headers)).get_json()
    assert queue["counts"] == {"available": 3, "scheduled": 1}
    assert queue["oldest_available_age_s"] >= 0
    paused = await (await client.post("/api/queues/work/pause", headers=auth_headers)).get_json()
    assert paused["paused"] is True
    resumed = await (await client.post("/api/queues/work/resume", headers=auth_headers)).get_json()
    assert resumed["paused"] is False
    purged = await (await client.post("/api/queues/work/purge", headers=auth_headers)).get_json()
    assert purged == {"purged": 4}
    after = await (await client.get("/api/queues/work", headers=auth_headers)).get_json()
    assert after["counts"] == {}
    assert (await client.post("/api/queues/nowhere/purge", headers=auth_headers)).status_code == 404


async def test_purge_cancels_what_a_parent_or_a_dependent_waits_for(
    client: Client, auth_headers: dict[str, str]
) -> None:
    """Deleted, a dependency would leave its dependent waiting for ever; cancelled, it tells it."""
    first = await enqueue(client, auth_headers, kind="noop", queue="doomed", delay_s=600)
    plain = await enqueue(client, auth_headers, kind="noop", queue="doomed")
    dependent = await enqueue(client, auth_headers, kind="noop", queue="kept", depends_on=[first["id"]])
    assert dependent["status"] == "waiting"

    purged = await (await client.post("/api/queues/doomed/purge", headers=auth_headers)).get_json()
    assert purged == {"purged": 2}
    gone = await client.get(f"/api/tasks/{plain['id']}", headers=auth_headers)
    assert gone.status_code == 404
    dependency = await (await client.get(f"/api/tasks/{first['id']}", headers=auth_headers)).get_json()
    assert (dependency["status"], dependency["last_error"]) == ("cancelled", "purged with its queue")
    after = await (await client.get(f"/api/tasks/{dependent['id']}?wait=10", headers=auth_headers)).get_json()
    assert after["status"] == "cancelled"


async def test_a_queue_too_large_for_one_statement_is_purged_in_chunks_and_bounded_calls(
    serving: Any, auth_headers: dict[str, str], clean_database: str, monkeypatch: Any
) -> None:
    """Purge deleted a queue's waiting tasks in one statement: past what one statement does within
    DB_COMMAND_TIMEOUT_S (100,000 tasks took 1.4 s of the default 2.5 s here; 50,000 against 0.3 s) every
    purge was a 503 and rolled back, so the queue could never be purged. It goes in short chunks
    now, bounded per call (call again for the rest)."""
    from app.src.api import queues

    monkeypatch.setattr(queues, "PURGE_MAX_PER_CALL", 30_000, raising=False)
    app = await serving(ROLES=["api"], DB_COMMAND_TIMEOUT_S=0.3)
    client = app.test_client()
    await enqueue(client, auth_headers, kind="noop", queue="big", delay_s=3600)
    await enqueue(client, auth_headers, kind="noop", queue="kept", delay_s=3600)
    await fetch(
        clean_database,
        "INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, priority, max_attempts, "
        "run_at, created_at) SELECT gen_random_uuid(), client_id, queue_id, queue, kind, payload, status, "
        "priority, max_attempts, run_at, created_at FROM tasks, generate_series(1, 49999) "
        "WHERE queue = 'big'",
    )
    purged = []
    for _ in range(3):
        response = await client.post("/api/queues/big/purge", headers=auth_headers)
        assert response.status_code == 200, await response.get_data(as_text=True)
        purged.append((await response.get_json())["purged"])
    assert purged == [30_000, 20_000, 0]
    rows = await fetch(clean_database, "SELECT queue, count(*) AS n FROM tasks GROUP BY queue")
    assert {r["queue"]: r["n"] for r in rows} == {"kept": 1}
