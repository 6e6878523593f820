"""API clients: keys shown once and stored hashed, revocation, disablement, tenancy, signing secrets."""

from __future__ import annotations

import asyncio
import base64
import uuid

from quart.typing import TestClientProtocol as Client
from standardwebhooks.webhooks import Webhook

from app.database import Database
from app.src.api.auth import active_signing_secrets
from app.src.api.models.auth import MAX_SIGNING_SECRETS, IssuedKey, NewOperator
from app.src.utils import sse
from tests.conftest import bearer, make_client
from tests.integration.auth.login_steps import PROBLEM
from tests.integration.test_remote_workers import WORKER, claim, register
from tests.task_harness import enqueue


async def test_an_operator_creates_a_client_whose_key_works_at_once(
    client: Client, operator_headers: dict[str, str], db: Database
) -> None:
    created = await client.post(
        "/api/auth/clients",
        json={"name": "billing", "scopes": ["tasks:read", "tasks:write"], "max_queued_tasks": 50},
        headers=operator_headers,
    )
    assert created.status_code == 201
    body = await created.get_json()
    assert set(body) == {"client_id", "key_id", "api_key"}
    assert body["api_key"].startswith("tg_")
    me = await (await client.get("/api/auth/me", headers=bearer(body["api_key"]))).get_json()
    assert me["kind"] == "client"
    assert me["client_id"] == body["client_id"]
    assert me["key_id"] == body["key_id"]
    assert me["scopes"] == ["tasks:read", "tasks:write"]
    assert me["max_queued_tasks"] == 50

    listed = await (await client.get("/api/auth/clients", headers=operator_headers)).get_json()
    assert [item["name"] for item in listed["items"]] == ["billing"]
    keys = await (
        await client.get(f"/api/auth/clients/{body['client_id']}/keys", headers=operator_headers)
    ).get_json()
    assert [key["id"] for key in keys["items"]] == [body["key_id"]]
    assert body["api_key"] not in str(keys)
    # only a digest is stored
    async with db.driver() as conn:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(body["key_id"]))
    assert body["api_key"] not in repr(dict(row))
    assert body["api_key"].encode() not in row["key_hash"]


async def test_creating_clients_needs_an_operator_and_the_scope(
    client: Client, auth_headers: dict[str, str], db: Database
) -> None:
    refused = await client.post(
        "/api/auth/clients", json={"name": "x", "scopes": ["tasks:read"]}, headers=auth_headers
    )
    assert refused.status_code == 403  # an API client, even with clients:admin
    reader = await make_client(db, "reader", ("tasks:read",))
    listing = await client.get("/api/auth/clients", headers=bearer(reader.api_key))
    assert listing.status_code == 403
    assert listing.mimetype == PROBLEM
    assert "clients:admin" in (await listing.get_json())["detail"]


async def test_bad_client_bodies_are_422(client: Client, operator_headers: dict[str, str]) -> None:
    for body in (
        {"name": "x", "scopes": ["tasks:everything"]},
        {"name": "", "scopes": ["tasks:read"]},
        {"scopes": ["tasks:read"]},
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["tasks:read"], "rate_limit_per_s": 0},
        # beyond the integer column: once a 500 from the database driver
        {"name": "x", "scopes": ["tasks:read"], "max_queued_tasks": 2**31},
    ):
        response = await client.post("/api/auth/clients", json=body, headers=operator_headers)
        assert response.status_code == 422, body
        assert response.mimetype == PROBLEM


async def test_key_revocation_takes_effect_on_the_next_request(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str]
) -> None:
    issued = await client.post(f"/api/auth/clients/{api_client.client_id}/keys", headers=auth_headers)
    assert issued.status_code == 201
    second = await issued.get_json()
    assert (await client.get("/api/auth/me", headers=bearer(second["api_key"]))).status_code == 200
    revoked = await client.delete(
        f"/api/auth/clients/{api_client.client_id}/keys/{second['key_id']}", headers=auth_headers
    )
    assert revoked.status_code == 200
    assert (await revoked.get_json())["revoked_at"] is not None
    assert (await client.get("/api/auth/me", headers=bearer(second["api_key"]))).status_code == 401
    assert (await client.get("/api/auth/me", headers=auth_headers)).status_code == 200
    missing = await client.delete(
        f"/api/auth/clients/{api_client.client_id}/keys/{uuid.uuid4()}", headers=auth_headers
    )
    assert missing.status_code == 404


async def test_an_open_event_stream_ends_once_its_key_is_revoked(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str]
) -> None:
    """A stream outlives the request that opened it: it once went on serving the task's changes
    to a revoked key (or a disabled client) until the task ended, days later for a waiting one."""
    second = await (
        await client.post(f"/api/auth/clients/{api_client.client_id}/keys", headers=auth_headers)
    ).get_json()
    task = await enqueue(client, bearer(second["api_key"]), kind="noop", delay_s=600)
    stream = asyncio.create_task(
        client.get(f"/api/tasks/{task['id']}/events", headers=bearer(second["api_key"]))
    )
    await asyncio.sleep(0.3)
    assert not stream.done()
    url = f"/api/auth/clients/{api_client.client_id}/keys/{second['key_id']}"
    assert (await client.delete(url, headers=auth_headers)).status_code == 200
    await asyncio.sleep(sse.RECHECK_ALLOWED_S + 0.1)
    cancelled = await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)
    assert cancelled.status_code == 200
    body = await (await asyncio.wait_for(stream, timeout=10)).get_data(as_text=True)
    assert '"status": "scheduled"' in body  # what it was allowed to see
    assert "cancelled" not in body  # what happened after the key was revoked


async def test_a_claim_long_poll_hands_out_nothing_once_its_key_is_revoked(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str]
) -> None:
    """A remote worker's claim waits up to 30 s for work: a key revoked meanwhile (by any API
    process) still claimed the tasks enqueued after it and handed them, payloads and leases, to
    the revoked key, whose completions were then refused. The claim now ends 401 instead."""
    await register(client, auth_headers)
    second = await (
        await client.post(f"/api/auth/clients/{api_client.client_id}/keys", headers=auth_headers)
    ).get_json()
    body = {"kinds": ["reports.build"], "wait_s": 10, "worker": WORKER}
    polling = asyncio.create_task(
        client.post("/api/workers/claim", json=body, headers=bearer(second["api_key"]))
    )
    await asyncio.sleep(0.3)
    assert not polling.done()
    url = f"/api/auth/clients/{api_client.client_id}/keys/{second['key_id']}"
    assert (await client.delete(url, headers=auth_headers)).status_code == 200
    task = await enqueue(client, auth_headers, kind="reports.build", payload={"account_id": 7})
    answer = await asyncio.wait_for(polling, timeout=15)
    assert answer.status_code == 401, await answer.get_data(as_text=True)
    # the task waits for a worker whose key holds
    claimed = await claim(client, auth_headers)
    assert [item["id"] for item in claimed["items"]] == [task["id"]]


async def test_a_task_long_poll_answers_401_once_its_key_is_revoked(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str]
) -> None:
    """`GET /api/tasks/{id}?wait=60` answered the task as it was at the end of the wait, its
    result included, to a key revoked during it."""
    second = await (
        await client.post(f"/api/auth/clients/{api_client.client_id}/keys", headers=auth_headers)
    ).get_json()
    task = await enqueue(client, auth_headers, kind="noop", delay_s=600)
    polling = asyncio.create_task(
        client.get(f"/api/tasks/{task['id']}?wait=20", headers=bearer(second["api_key"]))
    )
    await asyncio.sleep(0.3)
    assert not polling.done()
    url = f"/api/auth/clients/{api_client.client_id}/keys/{second['key_id']}"
    assert (await client.delete(url, headers=auth_headers)).status_code == 200
    cancelled = await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)
    assert cancelled.status_code == 200
    answer = await asyncio.wait_for(polling, timeout=15)
    assert answer.status_code == 401, await answer.get_data(as_text=True)


async def test_a_disabled_client_is_refused_until_enabled(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str], operator_headers: dict[str, str]
) -> None:
    url = f"/api/auth/clients/{api_client.client_id}"
    assert (await client.post(f"{url}/disable", headers=auth_headers)).status_code == 403
    disabled = await client.post(f"{url}/disable", headers=operator_headers)
    assert (await disabled.get_json())["disabled"] is True
    assert (await client.get("/api/auth/me", headers=auth_headers)).status_code == 401
    await client.post(f"{url}/enable", headers=operator_headers)
    assert (await client.get("/api/auth/me", headers=auth_headers)).status_code == 200


async def test_a_client_cannot_see_or_touch_another_clients_objects(
    client: Client,
    api_client: IssuedKey,
    other_client: IssuedKey,
    auth_headers: dict[str, str],
    operator_headers: dict[str, str],
) -> None:
    other = f"/api/auth/clients/{other_client.client_id}"
    secrets = await (await client.get(f"{other}/signing-secrets", headers=operator_headers)).get_json()
    secret_id = secrets["items"][0]["id"]
    attempts = [
        ("GET", other),
        ("GET", f"{other}/keys"),
        ("POST", f"{other}/keys"),
        ("DELETE", f"{other}/keys/{other_client.key_id}"),
        ("GET", f"{other}/signing-secrets"),
        ("POST", f"{other}/signing-secrets"),
        ("DELETE", f"{other}/signing-secrets/{secret_id}"),
        ("GET", f"/api/auth/clients/{uuid.uuid4()}"),  # and the same answer for an id that exists nowhere
    ]
    for method, path in attempts:
        response = await client.open(path, method=method, headers=auth_headers)
        assert response.status_code == 404, (method, path)
        assert response.mimetype == PROBLEM
    listed = await (await client.get("/api/auth/clients", headers=auth_headers)).get_json()
    assert [item["id"] for item in listed["items"]] == [str(api_client.client_id)]
    # nothing changed for the other tenant
    assert (await client.get("/api/auth/me", headers=bearer(other_client.api_key))).status_code == 200
    still = await (await client.get(f"{other}/signing-secrets", headers=operator_headers)).get_json()
    assert still == secrets
    # an operator sees every client
    everyone = await (await client.get("/api/auth/clients", headers=operator_headers)).get_json()
    assert {item["id"] for item in everyone["items"]} == {
        str(api_client.client_id),
        str(other_client.client_id),
    }


async def test_signing_secrets_rotate_newest_first_and_are_encrypted_at_rest(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str], db: Database
) -> None:
    url = f"/api/auth/clients/{api_client.client_id}/signing-secrets"
    first = await (await client.get(url, headers=auth_headers)).get_json()
    assert len(first["items"]) == 1
    original = first["items"][0]
    assert original["secret"].startswith("whsec_")
    assert len(base64.b64decode(original["secret"].removeprefix("whsec_"))) >= 24
    Webhook(original["secret"])  # the format Standard Webhooks verifiers accept

    added = await client.post(url, headers=auth_headers)
    assert added.status_code == 201
    items = (await added.get_json())["items"]
    assert [item["id"] for item in items][1] == original["id"]
    newest = items[0]
    assert await active_signing_secrets(db, client_id=api_client.client_id) == [
        newest["secret"],
        original["secret"],
    ]
    async with db.driver() as conn:
        stored = [row["secret"] for row in await conn.fetch("SELECT secret FROM signing_secrets")]
    assert not any(item["secret"] in " ".join(stored) for item in items)
    assert not any(item["secret"].removeprefix("whsec_") in " ".join(stored) for item in items)

    deleted = await client.delete(f"{url}/{original['id']}", headers=auth_headers)
    assert deleted.status_code == 200
    assert [item["id"] for item in (await deleted.get_json())["items"]] == [newest["id"]]
    assert await active_signing_secrets(db, client_id=api_client.client_id) == [newest["secret"]]
    last = await client.delete(f"{url}/{newest['id']}", headers=auth_headers)
    assert last.status_code == 409


async def test_signing_secrets_are_bounded_per_client_and_rotation_still_works(
    client: Client, api_client: IssuedKey, auth_headers: dict[str, str], db: Database
) -> None:
    # every delivery carries one signature per active secret: their number is bounded, so the
    # webhook-signature header is too
    url = f"/api/auth/clients/{api_client.client_id}/signing-secrets"
    for _ in range(MAX_SIGNING_SECRETS - 1):
        assert (await client.post(url, headers=auth_headers)).status_code == 201
    refused = await client.post(url, headers=auth_headers)
    assert refused.status_code == 409
    assert refused.mimetype == PROBLEM
    problem = await refused.get_json()
    assert problem["type"] == "urn:taskgate:problem:too-many-signing-secrets"
    assert str(MAX_SIGNING_SECRETS) in problem["detail"]
    items = (await (await client.get(url, headers=auth_headers)).get_json())["items"]
    assert len(items) == MAX_SIGNING_SECRETS
    assert len(await active_signing_secrets(db, client_id=api_client.client_id)) == MAX_SIGNING_SECRETS
    # rotation goes on: delete the oldest, then a new one is accepted beside the others
    assert (await client.delete(f"{url}/{items[-1]['id']}", headers=auth_headers)).status_code == 200
    assert (await client.post(url, headers=auth_headers)).status_code == 201


async def test_an_operator_tenant_has_signing_secrets_too(
    client: Client, operator: NewOperator, operator_headers: dict[str, str], db: Database
) -> None:
    url = f"/api/auth/clients/{operator.user_id}/signing-secrets"
    listed = await (await client.get(url, headers=operator_headers)).get_json()
    assert len(listed["items"]) == 1
    assert await active_signing_secrets(db, client_id=operator.user_id) == [listed["items"][0]["secret"]]


async def test_a_client_over_its_rate_limit_gets_429_with_retry_after(
    client: Client, operator_headers: dict[str, str]
) -> None:
    created = await client.post(
        "/api/auth/clients",
        json={"name": "slow", "scopes": ["tasks:read"], "rate_limit_per_s": 0.5},
        headers=operator_headers,
    )
    headers = bearer((await created.get_json())["api_key"])
    statuses = [(await client.get("/api/auth/me", headers=headers)).status_code for _ in range(3)]
    assert statuses[0] == 200
    assert statuses[-1] == 429
    limited = await client.get("/api/auth/me", headers=headers)
    assert limited.status_code == 429
    assert limited.mimetype == PROBLEM
    assert int(limited.headers["Retry-After"]) >= 1
    # other clients are not affected
    assert (await client.get("/api/auth/me", headers=operator_headers)).status_code == 200


async def test_a_rate_limit_near_zero_is_a_429_with_a_bounded_retry_after_not_a_500(
    client: Client, operator_headers: dict[str, str]
) -> None:
    """At 1e-320 requests a second, the wait for the next token is infinite: its Retry-After once
    raised OverflowError, a 500 for every request of the client after its first."""
    created = await client.post(
        "/api/auth/clients",
        json={"name": "frozen", "scopes": ["tasks:read"], "rate_limit_per_s": 1e-320},
        headers=operator_headers,
    )
    assert created.status_code == 201
    headers = bearer((await created.get_json())["api_key"])
    assert (await client.get("/api/auth/me", headers=headers)).status_code == 200
    limited = await client.get("/api/auth/me", headers=headers)
    assert limited.status_code == 429
    assert limited.mimetype == PROBLEM
    assert 1 <= int(limited.headers["Retry-After"]) <= 86_400
