"""POST /api/tasks/bulk/retry|cancel: by filter, chunked, counted, own tasks only."""

from __future__ import annotations

from quart import Quart

from app.database import Database
from tests.conftest import bearer, make_client
from tests.integration.flow.test_keyed_claim import batch
from tests.integration.test_worker_processes import Serving, count
from tests.task_harness import eventually, fetch


async def test_bulk_retry_of_5000_discarded_tasks_returns_5000_and_they_run(
    serving: Serving, auth_headers: dict[str, str], other_client_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(ROLES=["api", "worker"], WORKER_POLL_INTERVAL_S=0.1)
    client = app.test_client()
    await client.put("/api/queues/dead", json={"paused": True}, headers=auth_headers)
    await batch(client, auth_headers, [{"kind": "noop", "queue": "dead"}] * 5000)
    await batch(client, other_client_headers, [{"kind": "noop", "queue": "dead"}] * 10)
    await fetch(clean_database, "UPDATE tasks SET status = 'discarded', attempts = 3, finished_at = now()")
    await client.post("/api/queues/dead/resume", headers=auth_headers)
    response = await client.post(
        "/api/tasks/bulk/retry",
        json={"filter": {"queue": "dead", "status": "discarded"}},
        headers=auth_headers,
    )
    assert response.status_code == 200
    assert await response.get_json() == {"count": 5000}
    await eventually(lambda: _count_is(clean_database, "status = 'completed'", 5000), timeout=60)
    assert await count(clean_database, "status = 'discarded'") == 10  # the other client's, untouched
    again = await client.post(
        "/api/tasks/bulk/retry", json={"filter": {"queue": "dead"}}, headers=auth_headers
    )
    assert await again.get_json() == {"count": 0}


async def _count_is(database_uri: str, where: str, n: int) -> bool:
    return await count(database_uri, where) == n


async def test_bulk_cancel_by_filter_and_what_it_refuses(
    app: Quart,
    db: Database,
    auth_headers: dict[str, str],
    other_client_headers: dict[str, str],
    clean_database: str,
) -> None:
    client = app.test_client()
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "q1", "delay_s": 60}] * 30
        + [{"kind": "sleep", "queue": "q1", "delay_s": 60, "payload": {"seconds": 1}}] * 5,
    )
    await batch(client, other_client_headers, [{"kind": "noop", "queue": "q1", "delay_s": 60}] * 7)
    refused = [
        await client.post(
            "/api/tasks/bulk/cancel", json={"filter": {"status": "nope"}}, headers=auth_headers
        ),
        await client.post("/api/tasks/bulk/cancel", json={"filter": {}, "extra": 1}, headers=auth_headers),
        await client.post("/api/tasks/bulk/cancel", json={}, headers=auth_headers),
        # a number is not a date-time (pydantic would read it as a Unix time: 1970)
        await client.post(
            "/api/tasks/bulk/retry", json={"filter": {"created_before": 0}}, headers=auth_headers
        ),
        # a time with no UTC equivalent (year 0): once a 500 from the database driver
        await client.post(
            "/api/tasks/bulk/cancel",
            json={"filter": {"created_after": "0001-01-01T00:00:00+14:00"}},
            headers=auth_headers,
        ),
    ]
    assert [r.status_code for r in refused] == [422, 422, 422, 422, 422]
    assert all(r.headers["Content-Type"].startswith("application/problem+json") for r in refused)
    reader = await make_client(db, "reader", scopes=("tasks:read",))
    forbidden = await client.post(
        "/api/tasks/bulk/cancel", json={"filter": {}}, headers=bearer(reader.api_key)
    )
    assert forbidden.status_code == 403
    assert await count(clean_database, "status = 'cancelled'") == 0
    response = await client.post(
        "/api/tasks/bulk/cancel", json={"filter": {"kind": "noop"}}, headers=auth_headers
    )
    assert await response.get_json() == {"count": 30}
    assert await count(clean_database, "status = 'cancelled'") == 30
    assert await count(clean_database, "status = 'scheduled'") == 12  # 5 sleeps, 7 of the other client


async def test_bulk_retry_passes_over_dependents_it_must_refuse(
    app: Quart, auth_headers: dict[str, str], clean_database: str, monkeypatch: object
) -> None:
    """Dependents whose dependency is cancelled are refused a retry; picked first (they come first
    by id) they once cut every chunk short, and the call retried nothing at all."""
    from app.src.api import bulk

    monkeypatch.setattr(bulk, "CHUNK", 3)  # type: ignore[attr-defined]
    client = app.test_client()

    async def post(body: dict[str, object]) -> str:
        response = await client.post("/api/tasks", json=body, headers=auth_headers)
        assert response.status_code == 201, await response.get_data(as_text=True)
        return str((await response.get_json())["id"])

    dependency = await post({"kind": "sleep", "payload": {"seconds": 1}, "delay_s": 3600})  # not matched
    dependents = [await post({"kind": "noop", "depends_on": [dependency]}) for _ in range(3)]
    others = [await post({"kind": "noop", "delay_s": 3600}) for _ in range(5)]
    for task_id in (dependency, *others):
        assert (await client.post(f"/api/tasks/{task_id}/cancel", headers=auth_headers)).status_code == 200
    filter_ = {"filter": {"status": "cancelled", "kind": "noop"}}
    retried = await client.post("/api/tasks/bulk/retry", json=filter_, headers=auth_headers)
    assert retried.status_code == 200, await retried.get_data(as_text=True)
    assert (await retried.get_json())["count"] == 5  # the others; the dependents are refused
    rows = {str(r["id"]): r["status"] for r in await fetch(clean_database, "SELECT id, status FROM tasks")}
    assert [rows[d] for d in dependents] == ["cancelled"] * 3
    assert [rows[o] for o in others] == ["available"] * 5
    confirm = await client.post("/api/tasks/bulk/retry", json=filter_, headers=auth_headers)
    assert (await confirm.get_json())["count"] == 0  # nothing more it could retry


async def test_bulk_cancel_goes_past_running_tasks_it_already_asked_to_stop(
    app: Quart, auth_headers: dict[str, str], clean_database: str, monkeypatch: object
) -> None:
    """A running task stays `running` when asked to stop: picked first again by id in every chunk,
    such tasks once filled each chunk, so a call went round them up to its bound, counted each
    time, and never reached the queued tasks behind them."""
    from app.src.api import bulk

    monkeypatch.setattr(bulk, "CHUNK", 2)  # type: ignore[attr-defined]
    client = app.test_client()
    await batch(client, auth_headers, [{"kind": "noop", "queue": "q1", "delay_s": 60}] * 5)
    # the two oldest are running (a worker holds them): a cancel only asks them to stop
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'running', attempts = 1, started_at = now(), "
        "lease_expires_at = now() + interval '1 hour', worker_id = gen_random_uuid() "
        "WHERE id IN (SELECT id FROM tasks ORDER BY id LIMIT 2)",
    )
    response = await client.post(
        "/api/tasks/bulk/cancel", json={"filter": {"queue": "q1"}}, headers=auth_headers
    )
    assert response.status_code == 200
    assert await response.get_json() == {"count": 5}
    assert await count(clean_database, "status = 'cancelled'") == 3
    assert await count(clean_database, "status = 'running' AND cancel_requested") == 2
    again = await client.post(
        "/api/tasks/bulk/cancel", json={"filter": {"queue": "q1"}}, headers=auth_headers
    )
    assert await again.get_json() == {"count": 0}  # nothing more to cancel or ask


async def test_bulk_filter_whose_created_after_is_not_before_created_before_is_422_naming_it(
    app: Quart, auth_headers: dict[str, str], clean_database: str
) -> None:
    """An inverted (or empty) time range matches no task: it was answered 200 {"count": 0}, so a
    caller who swapped the two bounds learnt nothing. Now a 422 naming the field, nothing changed."""
    client = app.test_client()
    await batch(client, auth_headers, [{"kind": "noop", "queue": "q1", "delay_s": 60}] * 3)
    await fetch(clean_database, "UPDATE tasks SET status = 'discarded', finished_at = now()")
    later, earlier = "2030-01-02T00:00:00Z", "2020-01-01T00:00:00+00:00"
    for action in ("retry", "cancel"):
        for after, before in ((later, earlier), (earlier, earlier), ("2020-01-01T02:00:00+02:00", earlier)):
            response = await client.post(
                f"/api/tasks/bulk/{action}",
                json={"filter": {"created_after": after, "created_before": before}},
                headers=auth_headers,
            )
            assert response.status_code == 422, (action, after, before, await response.get_data(as_text=True))
            assert response.headers["Content-Type"].startswith("application/problem+json")
            problem = await response.get_json()
            assert [e["field"] for e in problem["errors"]] == ["body.filter.created_after"]
            assert "created_before" in problem["errors"][0]["message"]
    assert await count(clean_database, "status = 'discarded'") == 3
    # a proper range, and either bound alone, still work
    for filter_ in (
        {"created_after": earlier, "created_before": later},
        {"created_after": later},
        {"created_before": earlier},
    ):
        response = await client.post("/api/tasks/bulk/retry", json={"filter": filter_}, headers=auth_headers)
        assert response.status_code == 200, await response.get_data(as_text=True)
    assert await count(clean_database, "status = 'discarded'") == 0
