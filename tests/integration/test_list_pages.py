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


async def test_workers_come_in_pages(
    client: Client,
    auth_headers: dict[str, str],
    api_client: IssuedKey,
    other_client: IssuedKey,
    db: Database,
) -> None:
    # a client may run any number of workers: the list stopped at the 1,000 seen last, unsaid
    async with db.driver() as conn:
        await conn.fetch(
            "INSERT INTO workers (id, client_id, name, remote, last_seen_at) "
            "SELECT gen_random_uuid(), $1, 'w' || g, true, now() - g * interval '10 ms' "
            "FROM generate_series(1, 1005) g",
            api_client.client_id,
        )
        await conn.fetch(
            "INSERT INTO workers (id, client_id, name, remote, last_seen_at) VALUES "
            "(gen_random_uuid(), NULL, 'in-process', false, now()), "
            "(gen_random_uuid(), $1, 'another tenant''s', true, now()), "
            "(gen_random_uuid(), $2, 'gone', true, now() - interval '1 hour')",
            other_client.client_id,
            api_client.client_id,
        )
    first = await (await client.get("/api/workers", headers=auth_headers)).get_json()
    assert len(first["items"]) == 1000  # what an answer held before pages: no `limit` still gets it
    assert first["next_cursor"]
    following = {"limit": 1000, "cursor": first["next_cursor"]}
    last = await (await client.get("/api/workers", query_string=following, headers=auth_headers)).get_json()
    assert len(last["items"]) == 6
    assert "next_cursor" not in last  # the last page: {items}, as the list read before pages
    paged = await walk(client, "/api/workers", auth_headers, limit=500)
    names = [w["name"] for w in paged]
    assert len(names) == len(set(names)) == 1006  # each once: the client's 1,005 and the in-process one
    assert "in-process" in names
    assert "gone" not in names
    assert "another tenant's" not in names
    assert [w["id"] for w in paged] == sorted(w["id"] for w in paged)

    # a walk meanwhile: workers seen again (their last_seen_at moves) are neither skipped nor repeated
    half_page = await client.get("/api/workers", query_string={"limit": 500}, headers=auth_headers)
    half = await half_page.get_json()
    async with db.driver() as conn:
        await conn.fetch("UPDATE workers SET last_seen_at = now() WHERE name <> 'gone'")
    rest = await walk_from(client, "/api/workers", auth_headers, cursor=half["next_cursor"])
    assert sorted(w["name"] for w in half["items"] + rest) == sorted(names)

    await assert_refuses_bad_pages(client, "/api/workers", auth_headers)
    not_an_id = "WyJ4Il0"  # base64 of ["x"]: a key of the right shape, but no worker id
    refused = await client.get("/api/workers", query_string={"cursor": not_an_id}, headers=auth_headers)
    assert refused.status_code == 422
    assert [e["field"] for e in (await refused.get_json())["errors"]] == ["query.cursor"]


async def walk_from(
    client: Client, url: str, headers: dict[str, str], *, cursor: str
) -> list[dict[str, Any]]:
    """The items of a list from `cursor` to its last page."""
    items: list[dict[str, Any]] = []
    next_cursor: str | None = cursor
    while next_cursor is not None:
        response = await client.get(url, query_string={"limit": 500, "cursor": next_cursor}, headers=headers)
        body = await response.get_json()
        items += body["items"]
        next_cursor = body.get("next_cursor")
    return items


def sort_key(*parts: Any) -> str:
    """A cursor as the API makes them (base64url of a JSON array), of any key."""
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("url", "cursor"),
    [
        ("/api/tasks/{id}/attempts", sort_key(2**63)),
        ("/api/tasks/{id}/attempts", sort_key(-(2**70))),
        ("/api/tasks/{id}/steps", sort_key("2026-01-01T00:00:00+00:00", "\ud800")),
        ("/api/queues", sort_key("\udfff")),
        ("/api/catalog/kinds", sort_key(1, "a\ud800")),
        ("/api/hosts", sort_key("\udfff")),
    ],
    ids=["attempt past bigint", "attempt below bigint", "step lone surrogate", "queue lone surrogate",
         "kind lone surrogate", "host lone surrogate"],
)  # fmt: skip
async def test_a_cursor_whose_key_no_column_holds_is_a_422(
    client: Client, auth_headers: dict[str, str], url: str, cursor: str
) -> None:
    """JSON, and of the list's shape, but its integer is past a bigint or its text holds a lone
    surrogate (neither can be a sort key): each went to PostgreSQL's driver, which raised (a 500)."""
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    path = url.format(id=task["id"])
    response = await client.get(path, query_string={"cursor": cursor}, headers=auth_headers)
    assert response.status_code == 422, (path, await response.get_data(as_text=True))
    assert response.mimetype == PROBLEM
    assert [e["field"] for e in (await response.get_json())["errors"]] == ["query.cursor"]
