"""Lists that grow without a bound answer in keyset pages ({items, next_cursor}, `limit`, `cursor`),
and refuse a cursor they did not make or a limit out of range (422 naming it)."""

from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client
from quart_schema.validation import QUART_SCHEMA_RESPONSE_ATTRIBUTE

from app.database import Database
from app.src.api.models.auth import IssuedKey
from tests.conftest import make_client
from tests.integration.test_list_queries import _endpoint, _list_routes
from tests.task_harness import enqueue

PROBLEM = "application/problem+json"
# lists bounded by construction (no pages): what bounds them
BOUNDED = {
    "/api/auth/clients/<uuid:client_id>/signing-secrets": "at most 3 active secrets a client",
    # a client may name any number of workers: the list stops at the 1,000 seen last (LIMIT
    # 1000 in LIST_WORKERS), without saying so; pages would show the rest (README)
    "/api/workers": "the 1,000 workers seen last",
}


async def walk(client: Client, url: str, headers: dict[str, str], *, limit: int) -> list[dict[str, Any]]:
    """Every item of a list, page by page; each page holds `limit` items at most."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get(url, query_string=query, headers=headers)
        assert response.status_code == 200, await response.get_data(as_text=True)
        body = await response.get_json()
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body.get("next_cursor")
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


async def assert_refuses_bad_pages(
    client: Client, url: str, headers: dict[str, str], *, keyed: bool = True
) -> None:
    """`keyed`: a list whose cursor is a JSON sort key (app/src/api/pages.py)."""
    cases = [
        ({"cursor": "not-a-cursor"}, "query.cursor"),
        ({"limit": 100000}, "query.limit"),
        ({"limit": 0}, "query.limit"),
    ]
    if keyed:  # base64 of [1,2,3]: JSON, but no list's key
        cases.append(({"cursor": "WzEsMiwzXQ"}, "query.cursor"))
    for query, field in cases:
        response = await client.get(url, query_string=query, headers=headers)
        assert response.status_code == 422, (url, query, await response.get_data(as_text=True))
        assert response.mimetype == PROBLEM
        assert [e["field"] for e in (await response.get_json())["errors"]] == [field], (url, query)


def test_every_list_route_has_pages_or_a_documented_bound(app: Quart) -> None:
    """Meta-test: a list answers `next_cursor`, or says here what bounds it."""
    unpaged = []
    for rule in _list_routes(app):
        view = app.view_functions[_endpoint(app, rule)]
        model = getattr(view, QUART_SCHEMA_RESPONSE_ATTRIBUTE)[200][0]
        if "next_cursor" not in model.model_fields and rule not in BOUNDED:
            unpaged.append(rule)
    assert not unpaged, f"lists without pages or a documented bound: {unpaged}"


async def test_attempts_come_in_pages(client: Client, auth_headers: dict[str, str], db: Database) -> None:
    # retries by hand and durable suspensions add attempts past max_attempts: the list had no bound
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    async with db.driver() as conn:
        await conn.fetch(
            "INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, duration_ms) "
            "SELECT $1, g, now(), now(), 'failed', 1 FROM generate_series(1, 7) g",
            task["id"],
        )
    url = f"/api/tasks/{task['id']}/attempts"
    everything = await (await client.get(url, headers=auth_headers)).get_json()
    assert [a["attempt"] for a in everything["items"]] == [1, 2, 3, 4, 5, 6, 7]
    assert "next_cursor" not in everything  # the last page: as {items} read before pages
    paged = await walk(client, url, auth_headers, limit=3)
    assert [a["attempt"] for a in paged] == [1, 2, 3, 4, 5, 6, 7]
    await assert_refuses_bad_pages(client, url, auth_headers)


async def test_kinds_come_in_pages_local_then_remote(client: Client, auth_headers: dict[str, str]) -> None:
    schema = {"type": "object"}
    for name in ("zz.remote", "aa.remote", "mm.remote"):
        response = await client.put(f"/api/catalog/kinds/{name}", json={"payload_schema": schema},
                                    headers=auth_headers)  # fmt: skip
        assert response.status_code == 201
    everything = (await (await client.get("/api/catalog/kinds", headers=auth_headers)).get_json())["items"]
    paged = await walk(client, "/api/catalog/kinds", auth_headers, limit=2)
    assert [k["name"] for k in paged] == [k["name"] for k in everything]
    local = [k["name"] for k in paged if not k["remote"]]
    assert "noop" in local
    assert local == sorted(local)
    assert [k["name"] for k in paged if k["remote"]] == ["aa.remote", "mm.remote", "zz.remote"]
    assert [k["remote"] for k in paged] == sorted(k["remote"] for k in paged)  # local kinds first
    await assert_refuses_bad_pages(client, "/api/catalog/kinds", auth_headers)


async def test_clients_come_in_pages(
    client: Client, operator_headers: dict[str, str], api_client: IssuedKey, db: Database
) -> None:
    made = [api_client.client_id] + [(await make_client(db, f"client {i}")).client_id for i in range(4)]
    paged = await walk(client, "/api/auth/clients", operator_headers, limit=2)
    assert [c["id"] for c in paged] == [str(c) for c in made]  # oldest first, each once
    await assert_refuses_bad_pages(client, "/api/auth/clients", operator_headers)


async def test_keys_come_in_pages(
    client: Client, auth_headers: dict[str, str], api_client: IssuedKey
) -> None:
    url = f"/api/auth/clients/{api_client.client_id}/keys"
    for _ in range(4):
        assert (await client.post(url, headers=auth_headers)).status_code == 201
    everything = (await (await client.get(url, headers=auth_headers)).get_json())["items"]
    assert len(everything) == 5
    paged = await walk(client, url, auth_headers, limit=2)
    assert [k["id"] for k in paged] == [k["id"] for k in everything]  # newest first, each once
    await assert_refuses_bad_pages(client, url, auth_headers)


@pytest.mark.parametrize("path", ["/api/tasks", "/api/schedules", "/api/hosts"])
async def test_lists_paged_before_refuse_bad_pages_too(
    client: Client, auth_headers: dict[str, str], path: str
) -> None:
    await assert_refuses_bad_pages(client, path, auth_headers, keyed=False)
