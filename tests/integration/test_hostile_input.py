"""Hostile request bodies: each a 4xx problem+json that changes nothing, never a 500."""

import re
import time
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from tests.task_harness import fetch

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}


def nested(depth: int, leaf: str = "1") -> bytes:
    return ("[" * depth + leaf + "]" * depth).encode()


def nested_payload(depth: int, leaf: str = "1") -> bytes:
    inner = '{"a":' * depth + leaf + "}" * depth
    return ('{"kind": "noop", "payload": ' + inner + "}").encode()


async def task_count(database_uri: str) -> int:
    return int((await fetch(database_uri, "SELECT count(*) AS n FROM tasks"))[0]["n"])


@pytest.mark.parametrize("depth", [600, 5_000, 100_000])
@pytest.mark.parametrize("leaf", ["1", "12345678901234567890123"], ids=["int", "20-digit int"])
async def test_deeply_nested_body_is_a_quick_400(
    client: Client, auth_headers: dict[str, str], clean_database: str, depth: int, leaf: str
) -> None:
    for body in (nested_payload(depth, leaf), nested(depth, leaf)):
        started = time.monotonic()
        response = await client.post("/api/tasks", data=body, headers={**auth_headers, **JSON})
        assert time.monotonic() - started < 1.0
        assert response.status_code == 400, await response.get_data(as_text=True)
        assert response.mimetype == PROBLEM
        problem = await response.get_json()
        assert problem["type"] == "urn:taskgate:problem:json-too-deep"
        assert "64 levels" in problem["detail"]
    assert await task_count(clean_database) == 0
    assert (await client.get("/api/common/health")).status_code == 200


async def test_nesting_up_to_the_limit_is_accepted_and_stored(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    # the task body is the first of the 64 levels
    body = nested_payload(63, '"\\"[[[{{"')
    response = await client.post("/api/tasks", data=body, headers={**auth_headers, **JSON})
    assert response.status_code == 201, await response.get_data(as_text=True)
    assert await task_count(clean_database) == 1
    too_deep = await client.post("/api/tasks", data=nested_payload(64), headers={**auth_headers, **JSON})
    assert too_deep.status_code == 400


async def test_brackets_inside_strings_do_not_count_as_nesting(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    payload = '{"kind": "noop", "payload": {"text": "' + "[{" * 500 + '\\" [{"}}'
    response = await client.post("/api/tasks", data=payload.encode(), headers={**auth_headers, **JSON})
    assert response.status_code == 201, await response.get_data(as_text=True)


@pytest.mark.parametrize(
    "body",
    [
        b'{"kind": "noop", "payload": {"x": "\xff\xfe"}}',
        b'{"kind": "noop", "payload": {"n": 1234567890123456789012, "s": "\xc3\x28"}}',
    ],
    ids=["invalid utf-8", "invalid utf-8 with a 20-digit int"],
)
async def test_body_that_is_not_utf8_is_a_400(
    client: Client, auth_headers: dict[str, str], clean_database: str, body: bytes
) -> None:
    response = await client.post("/api/tasks", data=body, headers={**auth_headers, **JSON})
    assert response.status_code == 400, await response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    assert (await response.get_json())["type"] == "urn:taskgate:problem:malformed-json"
    assert await task_count(clean_database) == 0


def json_routes(app: Quart) -> list[tuple[str, str]]:
    """Every route that reads a JSON body (declares a request schema)."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not hasattr(app.view_functions[rule.endpoint], "_quart_schema_request_schema"):
            continue
        for method in sorted((rule.methods or set()) & {"POST", "PUT", "PATCH"}):
            path = re.sub(r"<uuid:[^>]+>", "00000000-0000-0000-0000-000000000000", rule.rule)
            path = re.sub(r"<[^>]+>", "x", path)
            routes.append((method, path))
    return routes


async def test_no_json_route_answers_500_to_hostile_bodies(
    app: Quart, client: Client, operator_headers: dict[str, str]
) -> None:
    routes = json_routes(app)
    assert len(routes) >= 8
    for method, path in routes:
        for body in (b'{"a": "\xff"}', nested(5_000), nested(5_000, "12345678901234567890123")):
            response = await client.open(path, method=method, data=body, headers={**operator_headers, **JSON})
            assert 400 <= response.status_code < 500, (method, path, response.status_code)
            assert response.mimetype == PROBLEM, (method, path)


async def test_raising_min_backoff_above_the_default_max_is_a_422_or_stored(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    async def put(body: dict[str, Any]) -> Any:
        return await client.put("/api/queues/slow", json=body, headers=auth_headers)

    # an existing queue: raise the max, then the min above the old default max
    assert (await put({"max_backoff_s": 7200})).status_code == 200
    raised = await put({"min_backoff_s": 5000})
    assert raised.status_code == 200, await raised.get_data(as_text=True)
    body = await raised.get_json()
    assert (body["min_backoff_s"], body["max_backoff_s"]) == (5000, 7200)
    # a min above the max, whichever was sent, names the field and changes nothing
    too_high = await put({"min_backoff_s": 8000})
    assert too_high.status_code == 422
    assert too_high.mimetype == PROBLEM
    assert [e["field"] for e in (await too_high.get_json())["errors"]] == ["body.min_backoff_s"]
    too_low = await put({"max_backoff_s": 10})
    assert too_low.status_code == 422
    assert [e["field"] for e in (await too_low.get_json())["errors"]] == ["body.max_backoff_s"]
    # a new queue whose min exceeds the default max is a 422, not a CHECK violation
    fresh = await client.put("/api/queues/fresh", json={"min_backoff_s": 5000}, headers=auth_headers)
    assert fresh.status_code == 422
    assert [e["field"] for e in (await fresh.get_json())["errors"]] == ["body.min_backoff_s"]
    both = await client.put(
        "/api/queues/fresh", json={"min_backoff_s": 5000, "max_backoff_s": 6000}, headers=auth_headers
    )
    assert both.status_code == 200
    rows = await fetch(clean_database, "SELECT name, min_backoff_s, max_backoff_s FROM queues ORDER BY name")
    assert {r["name"]: (r["min_backoff_s"], r["max_backoff_s"]) for r in rows} == {
        "fresh": (5000, 6000),
        "slow": (5000, 7200),
    }


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
async def test_a_time_past_year_9999_or_before_year_1_in_utc_is_a_422(
    client: Client, auth_headers: dict[str, str], clean_database: str, moment: str
) -> None:
    """Valid RFC 3339 with an offset, but no datetime once read in UTC: sending it to PostgreSQL
    raised OverflowError, a 500 (for a whole batch, and for a bulk filter)."""
    answers = [
        await client.post("/api/tasks", json={"kind": "noop", "run_at": moment}, headers=auth_headers),
        await client.post(
            "/api/tasks/batch",
            json={"tasks": [{"kind": "noop"}, {"kind": "noop", "run_at": moment}]},
            headers=auth_headers,
        ),
        await client.post(
            "/api/tasks/bulk/cancel", json={"filter": {"created_before": moment}}, headers=auth_headers
        ),
        await client.post(
            "/api/tasks/bulk/retry", json={"filter": {"created_after": moment}}, headers=auth_headers
        ),
    ]
    assert [a.status_code for a in answers] == [422] * 4
    assert all(a.mimetype == PROBLEM for a in answers)
    fields = [[e["field"] for e in (await a.get_json())["errors"]] for a in answers]
    assert fields == [
        ["body.run_at"],
        ["body.tasks.1.run_at"],
        ["body.filter.created_before"],
        ["body.filter.created_after"],
    ]
    assert await task_count(clean_database) == 0


async def test_a_key_rate_too_small_to_compute_is_a_422_and_changes_nothing(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A key rate of 1e-300 per second was stored: its window (1/rate seconds) is no interval, so
    once a key had started a task every keyed claim of the queue failed ("interval out of range"),
    and so did GET of its tasks (blocked_by)."""
    assert (
        await client.put("/api/queues/paced", json={"key_concurrency": 2}, headers=auth_headers)
    ).status_code == 200
    for rate in (1e-300, 1e-9):
        refused = await client.put(
            "/api/queues/paced", json={"key_rate_limit_per_s": rate}, headers=auth_headers
        )
        assert refused.status_code == 422, await refused.get_data(as_text=True)
        assert refused.mimetype == PROBLEM
        assert [e["field"] for e in (await refused.get_json())["errors"]] == ["body.key_rate_limit_per_s"]
    # one start a year per key is the slowest pace a queue takes
    slowest = await client.put(
        "/api/queues/paced", json={"key_rate_limit_per_s": 1 / (366 * 86_400)}, headers=auth_headers
    )
    assert slowest.status_code == 200, await slowest.get_data(as_text=True)
    rows = await fetch(
        clean_database, "SELECT key_concurrency, key_rate_limit_per_s FROM queues WHERE name = 'paced'"
    )
    assert [(r["key_concurrency"], r["key_rate_limit_per_s"]) for r in rows] == [(2, 1 / (366 * 86_400))]


# A run of 20 or more digits sends a body to the standard library's parser (json_provider.loads),
# which also took what orjson refuses: NaN, Infinity and a lone surrogate's escape.
LONG_NUMBER = "123456789012345678901234"
UNSTORABLE = {"lone surrogate": '"a\\ud800b"', "NaN": "NaN", "Infinity": "-Infinity"}


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_a_body_with_a_long_number_is_held_to_what_json_is(
    client: Client, auth_headers: dict[str, str], clean_database: str, value: str
) -> None:
    """Each was stored as far as PostgreSQL, which refused the text: a 500 for the enqueue, the
    batch, the signal, the schedule and the remote kind; now the same 400 as without the long
    number, and nothing stored."""
    task = await client.post("/api/tasks", json={"kind": "noop", "delay_s": 600}, headers=auth_headers)
    task_id = (await task.get_json())["id"]
    data = f'{{"x": {value}, "n": {LONG_NUMBER}}}'
    task_body = f'{{"kind": "noop", "payload": {data}}}'
    bodies = [
        ("POST", "/api/tasks", task_body),
        ("POST", "/api/tasks/batch", f'{{"tasks": [{{"kind": "noop"}}, {task_body}]}}'),
        ("POST", f"/api/tasks/{task_id}/signals/go", f'{{"data": {data}}}'),
        ("POST", "/api/schedules", f'{{"name": "s", "cron": "0 * * * *", "task": {task_body}}}'),
        ("PUT", "/api/catalog/kinds/reports", f'{{"payload_schema": {{"default": {data}}}}}'),
    ]  # fmt: skip
    for method, path, body in bodies:
        response = await client.open(
            path, method=method, data=body.encode(), headers={**auth_headers, **JSON}
        )
        assert response.status_code == 400, (path, await response.get_data(as_text=True))
        assert response.mimetype == PROBLEM
        assert (await response.get_json())["type"] == "urn:taskgate:problem:malformed-json"
    assert await task_count(clean_database) == 1
    for table in ("task_signals", "schedules", "remote_kinds"):
        assert not await fetch(clean_database, f"SELECT 1 FROM {table}")
    # the long number alone is read exactly, as before
    exact = await client.post(
        "/api/tasks", data=f'{{"kind": "noop", "payload": {{"n": {LONG_NUMBER}}}}}'.encode(),
        headers={**auth_headers, **JSON},
    )  # fmt: skip
    assert exact.status_code == 201
    assert (await exact.get_json())["payload"] == {"n": int(LONG_NUMBER)}
