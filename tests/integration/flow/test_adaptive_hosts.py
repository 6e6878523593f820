"""Adaptive destination limits (AIMD) for the `http` kind, and GET /api/hosts."""

from __future__ import annotations

from typing import Any

from quart import Quart

from tests.integration.test_http_kind import WORKER, Target, answer, done, in_order
from tests.integration.test_http_kind import target as target  # the fixture
from tests.integration.test_worker_processes import Serving
from tests.task_harness import enqueue, eventually, fetch


async def hosts(client: Any, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get("/api/hosts", headers=headers)
    assert response.status_code == 200, await response.get_data(as_text=True)
    items: list[dict[str, Any]] = (await response.get_json())["items"]
    return items


async def test_a_429_halves_the_hosts_limit_and_successes_grow_it_back(
    serving: Serving, auth_headers: dict[str, str], other_client_headers: dict[str, str], target: Target
) -> None:
    target.routes["/busy"] = in_order(answer(429, "slow down", **{"Retry-After": "0"}), answer(200, "ok"))
    target.routes["/ok"] = answer(200, "ok")
    app = await serving(**WORKER, HTTP_HOST_MAX_CONCURRENCY=8, HTTP_CIRCUIT_FAILURES=100)
    client = app.test_client()
    await client.put(
        "/api/queues/calls", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    host = f"127.0.0.1:{target.port}"
    task = await enqueue(
        client, auth_headers, kind="http", queue="calls", payload={"url": target.url("/busy")}
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "completed"
    assert finished["attempts"] == 2
    [seen] = await hosts(client, auth_headers)
    assert seen["host"] == host
    assert seen["max_concurrency"] == 8
    assert seen["concurrency_limit"] in (4, 5)  # halved by the 429, perhaps one back after the 200
    assert seen["recent_requests"] == 2
    assert seen["error_rate"] == 0.5
    assert seen["circuit"] == "closed"
    assert await hosts(client, other_client_headers) == []  # another tenant sees its own hosts only
    # windows of successes: +1 after each `limit` successes in a row, back to the full 8
    for _ in range(30):
        ok = await enqueue(
            client, auth_headers, kind="http", queue="calls", payload={"url": target.url("/ok")}
        )
        assert (await done(client, auth_headers, ok["id"]))["status"] == "completed"
    [recovered] = await hosts(client, auth_headers)
    assert recovered["concurrency_limit"] == 8
    assert recovered["in_flight"] == 0


async def test_the_limit_is_shared_by_every_worker_and_shown_in_metrics(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    # another process halved this host; this replica admits no more than the stored limit and
    # reports it in its gauges
    await fetch(
        clean_database, "INSERT INTO http_hosts (host, concurrency_limit) VALUES ('api.example:443', 3)"
    )
    await fetch(
        clean_database,
        "INSERT INTO http_host_permits (host, slot, holder, expires_at) "
        "VALUES ('api.example:443', 1, gen_random_uuid(), now() + interval '1 minute')",
    )
    app = await serving(ROLES=["api", "scheduler"], HTTP_HOST_MAX_CONCURRENCY=10)
    client = app.test_client()
    await eventually(lambda: _metric(client, 'taskgate_http_host_limit{host="api.example:443"} 3.0'))
    assert await _metric(client, 'taskgate_http_host_in_flight{host="api.example:443"} 1.0')


async def test_hosts_needs_queues_admin(app: Quart, clean_database: str) -> None:
    from app.database import Database  # noqa: F401
    from tests.conftest import bearer, make_client

    client = app.test_client()
    db = app.extensions["taskgate"].db
    reader = await make_client(db, "reader", scopes=("tasks:read",))
    assert (await client.get("/api/hosts", headers=bearer(reader.api_key))).status_code == 403
    assert (await client.get("/api/hosts")).status_code == 401


async def _metric(client: Any, text: str) -> bool:
    return text in await (await client.get("/metrics")).get_data(as_text=True)


async def test_hosts_are_listed_in_keyset_pages(
    app: Quart, auth_headers: dict[str, str], clean_database: str, api_client: Any, other_client: Any
) -> None:
    """Every host came in one answer: a client calling 100,000 destinations (webhooks to each of
    its customers) got 17 MB after 2.4 s, and a few more made it a 503 for good. Pages now, as
    every other list ({items, next_cursor})."""
    client = app.test_client()
    await fetch(
        clean_database,
        "INSERT INTO http_hosts (host) SELECT 'h' || i || '.example:443' FROM generate_series(100, 349) i",
    )
    for owner, hosts_of in (
        (api_client, "generate_series(100, 349)"),
        (other_client, "generate_series(90, 99)"),
    ):
        await fetch(
            clean_database,
            "INSERT INTO http_host_clients (host, client_id) "
            f"SELECT 'h' || i || '.example:443', $1 FROM {hosts_of} i",
            owner.client_id,
        )
    seen: list[str] = []
    pages = []
    query = "?limit=100"
    while True:
        response = await client.get(f"/api/hosts{query}", headers=auth_headers)
        assert response.status_code == 200, await response.get_data(as_text=True)
        page = await response.get_json()
        pages.append(len(page["items"]))
        seen += [h["host"] for h in page["items"]]
        if page["next_cursor"] is None:
            break
        query = f"?limit=100&cursor={page['next_cursor']}"
    assert pages == [100, 100, 50]
    assert seen == sorted(f"h{i}.example:443" for i in range(100, 350))  # own hosts only, each once
    refused = await client.get("/api/hosts?cursor=%%%", headers=auth_headers)
    assert refused.status_code == 422
    assert (await refused.get_json())["errors"][0]["field"] == "query.cursor"
