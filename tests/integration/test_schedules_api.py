"""The schedules API: create, read, list, change, pause/resume, delete, trigger; validation; tenancy."""

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from app.src.api import cron
from app.src.api.models.auth import Principal
from tests.task_harness import fetch

PROBLEM = "application/problem+json"
NIGHTLY = {
    "name": "nightly",
    "cron": "30 2 * * *",
    "timezone": "Europe/Berlin",
    "task": {"queue": "reports", "kind": "sleep", "payload": {"seconds": 1}},
}


async def create(client: Client, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = await client.post("/api/schedules", json={**NIGHTLY, **overrides}, headers=headers)
    assert response.status_code == 201, await response.get_data(as_text=True)
    body: dict[str, Any] = await response.get_json()
    return body


def parse_time(value: str) -> datetime:
    assert value.endswith("Z")
    return datetime.fromisoformat(value)


async def test_create_read_list_and_delete(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    before = datetime.now(UTC)
    created = await create(client, auth_headers)
    assert set(created) == {
        "id", "name", "cron", "timezone", "task", "paused", "next_run_at", "last_fire_time",
        "last_task_id", "created_at", "updated_at",
    }  # fmt: skip
    assert created["task"] == {**NIGHTLY["task"], "concurrency_key": None}
    assert (created["paused"], created["last_fire_time"], created["last_task_id"]) == (False, None, None)
    # next_run_at is the next 02:30 Berlin time, shown in UTC
    expected = cron.parse("30 2 * * *", "Europe/Berlin", allow_seconds=False).next_after(before)
    assert parse_time(created["next_run_at"]) == expected
    one = await client.get(f"/api/schedules/{created['id']}", headers=auth_headers)
    assert await one.get_json() == created
    second = await create(client, auth_headers, name="hourly", cron="@hourly", timezone="UTC")
    page = await (await client.get("/api/schedules?limit=1", headers=auth_headers)).get_json()
    assert [s["id"] for s in page["items"]] == [second["id"]]  # newest first
    rest = await (
        await client.get(f"/api/schedules?limit=1&cursor={page['next_cursor']}", headers=auth_headers)
    ).get_json()
    assert ([s["id"] for s in rest["items"]], rest["next_cursor"]) == ([created["id"]], None)
    deleted = await client.delete(f"/api/schedules/{created['id']}", headers=auth_headers)
    assert deleted.status_code == 200
    assert await deleted.get_json() == created
    assert (await client.get(f"/api/schedules/{created['id']}", headers=auth_headers)).status_code == 404
    assert [r["name"] for r in await fetch(clean_database, "SELECT name FROM schedules")] == ["hourly"]


async def test_the_same_delete_sent_again_answers_the_schedule_as_it_was(
    client: Client, auth_headers: dict[str, str], other_client_headers: dict[str, str], clean_database: str
) -> None:
    """A delete sent again after its answer was lost (a 503 after its commit) was answered 404: the
    caller was told "no such schedule" of the one its first send had deleted. It is answered as
    the first send was, for as long as idempotency keys are kept; another client's stays a 404."""
    created = await create(client, auth_headers)
    url = f"/api/schedules/{created['id']}"
    first = await client.delete(url, headers=auth_headers)
    again = await client.delete(url, headers=auth_headers)
    assert (again.status_code, await again.get_json()) == (200, await first.get_json())
    assert await first.get_json() == created
    assert (await client.get(url, headers=auth_headers)).status_code == 404
    assert (await client.delete(url, headers=other_client_headers)).status_code == 404
    assert await fetch(clean_database, "SELECT id FROM schedules") == []
    # forgotten (pruned past IDEMPOTENCY_RETENTION_HOURS): a 404 again
    await fetch(clean_database, "DELETE FROM deleted_schedules")
    assert (await client.delete(url, headers=auth_headers)).status_code == 404


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cron": "61 * * * *"}, "body.cron"),
        ({"cron": "* * *"}, "body.cron"),
        ({"cron": "0 0 30 2 *"}, "body.cron"),
        ({"cron": ""}, "body.cron"),
        ({"timezone": "Mars/Olympus"}, "body.timezone"),
        ({"timezone": "../../etc/passwd"}, "body.timezone"),
        # files of the zone database that are not IANA zones: each replica's own clock setting,
        # and zones that count leap seconds (fires 27 s late)
        ({"timezone": "localtime"}, "body.timezone"),
        ({"timezone": "right/Europe/Berlin"}, "body.timezone"),
        ({"timezone": "posix/Europe/Berlin"}, "body.timezone"),
        ({"task": {"kind": "sleep", "payload": {"seconds": "soon"}}}, "body.task.payload.seconds"),
        ({"task": {"kind": "sleep", "payload": {}}}, "body.task.payload.seconds"),
        ({"task": {"kind": "nope"}}, "body.task.kind"),
        ({"task": {"kind": "noop", "queue": "bad name!"}}, "body.task.queue"),
        ({"name": ""}, "body.name"),
        ({"surprise": 1}, "body.surprise"),
    ],
)
async def test_invalid_schedules_are_422_naming_the_field(
    client: Client, auth_headers: dict[str, str], clean_database: str, overrides: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/schedules", json={**NIGHTLY, **overrides}, headers=auth_headers)
    assert response.status_code == 422
    assert response.mimetype == PROBLEM
    problem = await response.get_json()
    assert field in [error["field"] for error in problem["errors"]], problem["errors"]
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM schedules"))[0]["n"] == 0


async def test_every_failing_field_is_listed_at_once(client: Client, auth_headers: dict[str, str]) -> None:
    response = await client.post(
        "/api/schedules",
        json={**NIGHTLY, "cron": "nope", "task": {"kind": "sleep", "payload": {}}},
        headers=auth_headers,
    )
    fields = {error["field"] for error in (await response.get_json())["errors"]}
    assert fields == {"body.cron", "body.task.payload.seconds"}
    bad_zone = await client.post(
        "/api/schedules", json={**NIGHTLY, "timezone": "Nowhere"}, headers=auth_headers
    )
    assert {e["field"] for e in (await bad_zone.get_json())["errors"]} == {"body.timezone"}


async def test_seconds_are_refused_outside_tests(serving: Any, auth_headers: dict[str, str]) -> None:
    app = await serving(ROLES=["api"], APP_ENV="dev")
    response = await app.test_client().post(
        "/api/schedules", json={**NIGHTLY, "cron": "* * * * * *"}, headers=auth_headers
    )
    assert response.status_code == 422
    assert [e["field"] for e in (await response.get_json())["errors"]] == ["body.cron"]


async def test_names_are_unique_per_client(client: Client, auth_headers: dict[str, str]) -> None:
    await create(client, auth_headers)
    again = await client.post("/api/schedules", json={**NIGHTLY, "cron": "@hourly"}, headers=auth_headers)
    assert again.status_code == 409
    assert again.mimetype == PROBLEM
    other = await create(client, auth_headers, name="other")
    renamed = await client.patch(
        f"/api/schedules/{other['id']}", json={"name": "nightly"}, headers=auth_headers
    )
    assert renamed.status_code == 409


async def test_patch_pause_resume_and_change(client: Client, auth_headers: dict[str, str]) -> None:
    created = await create(client, auth_headers)
    url = f"/api/schedules/{created['id']}"
    paused = await (await client.patch(url, json={"paused": True}, headers=auth_headers)).get_json()
    assert (paused["paused"], paused["next_run_at"]) == (True, None)
    assert paused["updated_at"] >= created["updated_at"]
    resumed = await (await client.patch(url, json={"paused": False}, headers=auth_headers)).get_json()
    assert (resumed["paused"], resumed["next_run_at"]) == (False, created["next_run_at"])
    moved = await (
        await client.patch(
            url, json={"cron": "0 9 * * 1-5", "timezone": "America/New_York"}, headers=auth_headers
        )
    ).get_json()
    first = parse_time(moved["next_run_at"])
    assert first.astimezone(cron.zone("America/New_York")).strftime("%H:%M %a") in {
        f"09:00 {day}" for day in ("Mon", "Tue", "Wed", "Thu", "Fri")
    }
    retasked = await (
        await client.patch(
            url, json={"name": "renamed", "task": {"kind": "noop", "payload": {"x": 1}}}, headers=auth_headers
        )
    ).get_json()
    assert retasked["task"] == {
        "queue": "default",
        "kind": "noop",
        "payload": {"x": 1},
        "concurrency_key": None,
    }
    assert (retasked["name"], retasked["next_run_at"], retasked["cron"]) == (
        "renamed", moved["next_run_at"], "0 9 * * 1-5",
    )  # fmt: skip
    for body, field in (
        ({"cron": "bad"}, "body.cron"),
        ({"timezone": "Nowhere/Else"}, "body.timezone"),
        ({"paused": None}, "body.paused"),
        ({"task": {"kind": "sleep", "payload": {"seconds": -1}}}, "body.task.payload.seconds"),
        ({"extra": True}, "body.extra"),
    ):
        response = await client.patch(url, json=body, headers=auth_headers)
        assert response.status_code == 422, body
        assert field in [e["field"] for e in (await response.get_json())["errors"]]
    unchanged = await (await client.get(url, headers=auth_headers)).get_json()
    assert unchanged == retasked


async def test_trigger_enqueues_the_template_now(client: Client, auth_headers: dict[str, str]) -> None:
    created = await create(client, auth_headers, paused=True)
    response = await client.post(f"/api/schedules/{created['id']}/trigger", headers=auth_headers)
    assert response.status_code == 201
    task = await response.get_json()
    assert (task["queue"], task["kind"], task["payload"], task["status"]) == (
        "reports", "sleep", {"seconds": 1}, "available",
    )  # fmt: skip
    assert task["schedule"]["id"] == created["id"]
    assert (task["schedule"]["manual"], task["schedule"]["coalesced_fires"]) == (True, 0)
    read = await (await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)).get_json()
    assert read["schedule"] == task["schedule"]
    after = await (await client.get(f"/api/schedules/{created['id']}", headers=auth_headers)).get_json()
    assert (after["paused"], after["next_run_at"], after["last_fire_time"]) == (True, None, None)


async def test_another_clients_schedule_is_404(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    foreign = uuid.uuid4()
    await fetch(
        clean_database,
        "INSERT INTO schedules (id, client_id, name, cron, timezone, queue, kind, payload, next_run_at) "
        "VALUES ($1, $2, 'theirs', '* * * * *', 'UTC', 'default', 'noop', '{}', now() + interval '1 hour')",
        foreign,
        uuid.uuid4(),
    )
    url = f"/api/schedules/{foreign}"
    assert (await client.get(url, headers=auth_headers)).status_code == 404
    assert (await client.patch(url, json={"paused": True}, headers=auth_headers)).status_code == 404
    assert (await client.post(url + "/trigger", headers=auth_headers)).status_code == 404
    assert (await client.delete(url, headers=auth_headers)).status_code == 404
    listing = await (await client.get("/api/schedules", headers=auth_headers)).get_json()
    assert listing == {"items": [], "next_cursor": None}
    missing = await client.get(f"/api/schedules/{uuid.uuid4()}", headers=auth_headers)
    assert missing.status_code == 404
    assert missing.mimetype == PROBLEM
    rows = await fetch(clean_database, "SELECT paused, (SELECT count(*) FROM tasks) AS tasks FROM schedules")
    assert [(r["paused"], r["tasks"]) for r in rows] == [(False, 0)]


async def test_schedules_need_the_schedules_admin_scope(app: Quart, client: Client) -> None:
    assert (await client.get("/api/schedules")).status_code == 401

    class TasksOnly:
        async def authenticate(self, token: str) -> Principal | None:
            return Principal(
                kind="client", client_id=uuid.uuid4(), scopes=frozenset({"tasks:read", "tasks:write"})
            )

    app.extensions["taskgate"].authenticator = TasksOnly()
    headers = {"Authorization": "Bearer any"}
    some = uuid.uuid4()
    for method, url in (
        ("GET", "/api/schedules"), ("POST", "/api/schedules"), ("GET", f"/api/schedules/{some}"),
        ("PATCH", f"/api/schedules/{some}"), ("DELETE", f"/api/schedules/{some}"),
        ("POST", f"/api/schedules/{some}/trigger"),
    ):  # fmt: skip
        response = await client.open(url, method=method, json=NIGHTLY, headers=headers)
        assert response.status_code == 403, (method, url)


async def test_the_same_schedule_sent_again_is_answered_as_it_is_not_409(
    client: Client, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A creation answered 503 after its commit (PostgreSQL lost on the way back), or whose answer
    was lost, and sent again was a 409 "already exists" for the schedule it had made: the SDK
    raised for a call that succeeded. The same name and definition is answered 200 with the
    schedule; a schedule of that name that differs in anything is still a 409."""
    template = {
        **NIGHTLY,
        "task": {"queue": "reports", "kind": "noop", "payload": {"seconds": 1, "tags": ["a"]}},
    }
    created = await create(client, auth_headers, **template)
    # the same request (its payload keys in another order, the cron with blanks around it)
    same = {
        **template,
        "cron": f" {NIGHTLY['cron']} ",
        "task": {**template["task"], "payload": {"tags": ["a"], "seconds": 1}},
    }
    again = await client.post("/api/schedules", json=same, headers=auth_headers)
    assert again.status_code == 200, await again.get_data(as_text=True)
    assert await again.get_json() == created
    for differs in (
        {"cron": "@hourly"},
        {"timezone": "UTC"},
        {"paused": True},
        {"task": {**template["task"], "queue": "other"}},
        {"task": {**template["task"], "payload": {"seconds": True, "tags": ["a"]}}},
        {"task": {**template["task"], "concurrency_key": "k"}},
    ):
        refused = await client.post("/api/schedules", json={**template, **differs}, headers=auth_headers)
        assert refused.status_code == 409, differs
    rows = await fetch(clean_database, "SELECT id FROM schedules")
    assert [str(r["id"]) for r in rows] == [created["id"]]
