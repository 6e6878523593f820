"""The built-in `http` kind end to end: real aiohttp targets on loopback, a real PostgreSQL.

Targets listen on 127.0.0.1, which only HTTP_ALLOWED_NETWORKS=127.0.0.0/8 makes reachable; the
SSRF tests leave it unset and check that nothing reaches the target.
"""

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from quart import Quart
from standardwebhooks import Webhook

from app import create_app
from app.settings import Settings
from tests.task_harness import enqueue, eventually, fetch, spawn_worker, started

Serving = Callable[..., Awaitable[Quart]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
WORKER = {"ROLES": ["api", "worker"], "HTTP_ALLOWED_NETWORKS": LOOPBACK}
SECRET_OLD = "whsec_" + base64.b64encode(b"the-old-secret-of-32-bytes-long!").decode()
SECRET_NEW = "whsec_" + base64.b64encode(b"the-new-secret-of-32-bytes-long!").decode()


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Target:
    """An aiohttp server on 127.0.0.1 that records every request and answers per path."""

    routes: dict[str, Handler] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path.split("?")[0] == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.received.append(
            Received(
                request.method, request.path_qs, dict(request.headers), await request.read(), time.time()
            )
        )
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server = Target()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def answer(status: int, body: str = "", **headers: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    return handle


def in_order(*handlers: Handler) -> Handler:
    """The n-th request gets the n-th handler; the last one repeats."""
    calls = [0]

    async def handle(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        return await handlers[min(calls[0], len(handlers)) - 1](request)

    return handle


async def done(client: Any, headers: dict[str, str], task_id: str, wait: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        response = await client.get(f"/api/tasks/{task_id}?wait={min(20, wait)}", headers=headers)
        task: dict[str, Any] = await response.get_json()
        if task["status"] in ("completed", "discarded", "cancelled") or time.monotonic() > deadline:
            return task


async def attempts(client: Any, headers: dict[str, str], task_id: str) -> list[dict[str, Any]]:
    body = await (await client.get(f"/api/tasks/{task_id}/attempts", headers=headers)).get_json()
    items: list[dict[str, Any]] = body["items"]
    return items


async def test_a_delivery_is_signed_with_every_active_secret(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/hooks"] = answer(200, '{"ok": true}', **{"Content-Type": "application/json"})
    app = await serving(**WORKER)
    asked: list[UUID] = []

    async def secrets(client_id: UUID) -> list[str]:
        asked.append(client_id)
        return [SECRET_NEW, SECRET_OLD]  # a rotation in progress: both sign

    app.extensions["taskgate"].http.signing_secrets = secrets
    client = app.test_client()
    task = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={
            "url": target.url("/hooks", host="localhost"),
            "json": {"order": 42},
            "headers": {"X-Trace": "t1"},
        },
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "completed", finished["last_error"]
    assert finished["result"]["status"] == 200
    assert finished["result"]["body"] == '{"ok": true}'
    assert finished["result"]["headers"]["Content-Type"].startswith("application/json")
    assert finished["result"]["duration_ms"] > 0
    [request] = target.to("/hooks")
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Trace"] == "t1"
    assert request.headers["webhook-id"] == task["id"]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_NEW, SECRET_OLD):  # verified independently, by the standardwebhooks package
        assert Webhook(secret).verify(request.body, request.headers) == {"order": 42}
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"someone-else's-secret-32-bytes!!").decode()).verify(
            request.body, request.headers
        )
    assert len(set(asked)) == 1
    [attempt] = await attempts(client, auth_headers, task["id"])
    assert (attempt["outcome"], attempt["http_status"], attempt["error"]) == ("completed", 200, None)


async def test_deliveries_carry_the_clients_own_signatures_through_a_rotation(
    serving: Serving, auth_headers: dict[str, str], api_client: Any, target: Target
) -> None:
    target.routes["/hooks"] = answer(204)
    app = await serving(**WORKER)  # the runtime's provider: the client's secrets from the auth domain
    client = app.test_client()
    rotated = await client.post(
        f"/api/auth/clients/{api_client.client_id}/signing-secrets", headers=auth_headers
    )
    assert rotated.status_code == 201
    secrets = [item["secret"] for item in (await rotated.get_json())["items"]]
    assert len(secrets) == 2  # the one made with the client, and the new one
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/hooks"), "body": "hi"}
    )
    assert (await done(client, auth_headers, task["id"]))["status"] == "completed"
    [request] = target.to("/hooks")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in secrets:
        assert Webhook(secret).verify(request.body, request.headers, json_parse=False) is None


async def test_a_worker_that_cannot_decrypt_the_clients_secrets_sends_nothing_unsigned(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/hooks"] = answer(204)
    # the client's secret was sealed with the suite's SECRET_KEYS; this process has other keys
    app = await serving(**WORKER, SECRET_KEYS=[Fernet.generate_key().decode()])
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/hooks"), "body": "hi"}
    )

    async def retried() -> dict[str, Any] | None:
        response = await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)
        body: dict[str, Any] = await response.get_json()
        return body if body["status"] == "retryable" else None

    retrying = await eventually(retried)
    assert "signing secrets" in retrying["last_error"]
    assert target.to("/hooks") == []


async def test_503_with_retry_after_is_retried_after_the_wait_then_completes(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    busy = answer(503, "busy", **{"Retry-After": "1"})
    target.routes["/flaky"] = in_order(busy, busy, answer(200, "finally"))
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/polite", json={"min_backoff_s": 0.05, "max_backoff_s": 10}, headers=auth_headers
    )
    task = await enqueue(
        client, auth_headers, kind="http", queue="polite", payload={"url": target.url("/flaky")}
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "completed"
    assert finished["attempts"] == 3
    assert finished["result"]["body"] == "finally"
    records = await attempts(client, auth_headers, task["id"])
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in records] == [
        (1, "failed", 503),
        (2, "failed", 503),
        (3, "completed", 200),
    ]
    assert "HTTP 503" in records[0]["error"]
    assert "busy" in records[0]["error"]
    starts = [datetime.fromisoformat(a["started_at"]) for a in records]
    ends = [datetime.fromisoformat(a["finished_at"]) for a in records]
    for i in (1, 2):
        assert (starts[i] - ends[i - 1]).total_seconds() >= 0.95  # Retry-After: 1 honoured
    arrivals = [r.at for r in target.to("/flaky")]
    assert len(arrivals) == 3
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(arrivals))
    assert len({r.headers["webhook-id"] for r in target.to("/flaky")}) == 1  # stable across retries


async def test_a_400_is_discarded_after_one_attempt(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/strict"] = answer(400, '{"error": "missing field"}')
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/strict"), "json": {}}
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "discarded"
    assert finished["attempts"] == 1
    assert finished["last_error"].startswith("HTTP 400")
    assert "missing field" in finished["last_error"]
    [record] = await attempts(client, auth_headers, task["id"])
    assert (record["outcome"], record["http_status"]) == ("failed", 400)
    assert len(target.to("/strict")) == 1


async def test_a_timeout_is_retried_and_recorded(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(text="too late")

    target.routes["/slow"] = slow
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/quick", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    task = await enqueue(
        client,
        auth_headers,
        kind="http",
        queue="quick",
        max_attempts=2,
        payload={"url": target.url("/slow"), "timeout_s": 0.3},
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "discarded"
    records = await attempts(client, auth_headers, task["id"])
    assert [(a["outcome"], a["http_status"]) for a in records] == [("failed", None), ("failed", None)]
    assert all("timed out after 0.3 s" in a["error"] for a in records)
    assert all(250 <= a["duration_ms"] < 2000 for a in records)


async def test_only_the_first_64_kib_of_a_response_are_kept(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/big"] = answer(200, "x" * (1024 * 1024))
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/big"), "method": "GET"}
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "completed"
    assert finished["result"]["body"] == "x" * 65536


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"method": "POST"}, "payload.url"),
        ({"url": "ftp://example.com/"}, "payload.url"),
        ({"url": "https://example.com/", "headers": {"X-A": "1\r\nX-Injected: 1"}}, "payload.headers"),
        ({"url": "https://example.com/", "headers": {"X-A\nB": "1"}}, "payload.headers"),
        ({"url": "https://example.com/", "body": "a", "json": {"b": 1}}, "payload"),
        ({"url": "https://example.com/", "timeout_s": 901}, "payload.timeout_s"),
        ({"url": "https://example.com/", "timeout_s": -1}, "payload.timeout_s"),
        ({"url": "https://example.com/", "success_codes": [99]}, "payload.success_codes.0"),
        ({"url": "https://a..example.com/"}, "payload.url"),  # no name lookup can take these
        ({"url": f"https://{'a' * 64}.example.com/"}, "payload.url"),
    ],
)
async def test_invalid_payloads_get_422_with_field_errors(
    serving: Serving, auth_headers: dict[str, str], payload: dict[str, Any], field: str
) -> None:
    app = await serving(ROLES=["api"])
    response = await app.test_client().post(
        "/api/tasks", json={"kind": "http", "payload": payload}, headers=auth_headers
    )
    assert response.status_code == 422
    problem = await response.get_json()
    assert field in [error["field"] for error in problem["errors"]], problem


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://10.0.0.1/",
        "http://192.168.0.10/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/",
        "http://[::1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://2130706433/",
    ],
)
async def test_literal_forbidden_addresses_are_refused_at_enqueue(
    serving: Serving, auth_headers: dict[str, str], url: str
) -> None:
    app = await serving(ROLES=["api"])
    response = await app.test_client().post(
        "/api/tasks", json={"kind": "http", "payload": {"url": url}}, headers=auth_headers
    )
    assert response.status_code == 422
    [error] = (await response.get_json())["errors"]
    assert error["field"] == "payload.url"
    assert "destination refused" in error["message"]


async def test_the_allowlist_admits_its_literals_but_never_cloud_metadata(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    everything = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    app = await serving(ROLES=["api"], HTTP_ALLOWED_NETWORKS=everything)
    client = app.test_client()
    await enqueue(client, auth_headers, kind="http", delay_s=3600, payload={"url": "http://10.0.0.1/"})
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/"):
        response = await client.post(
            "/api/tasks", json={"kind": "http", "payload": {"url": url}}, headers=auth_headers
        )
        assert response.status_code == 422


async def test_a_name_resolving_to_loopback_is_discarded_without_the_allowlist(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/internal"] = answer(200, "secret")
    app = await serving(ROLES=["api", "worker"])  # HTTP_ALLOWED_NETWORKS unset: public addresses only
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/internal", host="localhost")}
    )
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "discarded"
    assert finished["attempts"] == 1
    assert "destination refused" in finished["last_error"]
    assert "loopback" in finished["last_error"]
    assert target.received == []


async def test_redirects_are_followed_only_when_asked_and_each_hop_is_checked(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/old"] = answer(307, Location="/new")
    target.routes["/new"] = answer(200, "moved here")
    target.routes["/to-metadata"] = answer(302, Location="http://169.254.169.254/latest/meta-data/")
    target.routes["/to-private"] = answer(302, Location="http://10.1.2.3/")
    target.routes["/loop"] = answer(302, Location="/loop")
    app = await serving(**WORKER)
    client = app.test_client()

    not_followed = await enqueue(client, auth_headers, kind="http", payload={"url": target.url("/old")})
    followed = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/old"), "follow_redirects": True, "body": "b"},
    )
    to_metadata = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/to-metadata"), "follow_redirects": True},
    )
    to_private = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/to-private"), "follow_redirects": True},
    )
    looping = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/loop"), "follow_redirects": True}
    )

    first = await done(client, auth_headers, not_followed["id"])
    assert (first["status"], first["attempts"]) == ("discarded", 1)
    assert "follow_redirects" in first["last_error"]
    second = await done(client, auth_headers, followed["id"])
    assert second["status"] == "completed"
    assert second["result"]["body"] == "moved here"
    assert [r.body for r in target.to("/new")] == [b"b"]  # a 307 keeps method and body
    for refused, reason in ((to_metadata, "metadata"), (to_private, "private")):
        task = await done(client, auth_headers, refused["id"])
        assert (task["status"], task["attempts"]) == ("discarded", 1)
        assert reason in task["last_error"]
    looped = await done(client, auth_headers, looping["id"])
    assert looped["status"] == "discarded"
    assert "more than 5 redirects" in looped["last_error"]
    assert len(target.to("/loop")) == 6


def async_job(target: Target, *, polls_before_done: int) -> None:
    """A provider of long-running jobs: 202 + Location, a status URL, 303 to the result."""
    target.routes["/jobs"] = answer(202, Location="/jobs/7/status", **{"Retry-After": "1"})

    async def status(request: web.Request) -> web.StreamResponse:
        if len(target.to("/jobs/7/status")) <= polls_before_done:
            return web.Response(status=202, headers={"Retry-After": "1"})
        return web.Response(status=303, headers={"Location": "/jobs/7/result"})

    target.routes["/jobs/7/status"] = status
    target.routes["/jobs/7/result"] = answer(200, '{"answer": 42}')


async def test_async_request_reply_is_followed_to_its_result_across_a_restart(
    settings: Settings, clean_database: str, auth_headers: dict[str, str], target: Target
) -> None:
    async_job(target, polls_before_done=1)
    roles = {**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2}
    first = create_app(settings.model_copy(update=roles))
    async with first.test_app():
        client = first.test_client()
        task = await enqueue(
            client,
            auth_headers,
            kind="http",
            payload={"url": target.url("/jobs"), "json": {"n": 7}, "follow_async": True},
        )

        async def polled_once() -> bool:
            rows = await fetch(
                clean_database, "SELECT status, result FROM tasks WHERE id = $1", UUID(task["id"])
            )
            return rows[0]["status"] == "waiting" and json.loads(rows[0]["result"]).get("polls") == 1

        await eventually(polled_once)
        assert len(target.to("/jobs/7/status")) == 1  # answered 202: still running
        waiting = await (await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)).get_json()
        assert waiting["result"]["status_url"] == target.url("/jobs/7/status")
    # the whole runtime is gone; everything the poller needs is in PostgreSQL
    second = create_app(settings.model_copy(update=roles))
    async with second.test_app():
        client = second.test_client()
        finished = await done(client, auth_headers, task["id"])
        assert finished["status"] == "completed", finished["last_error"]
        assert finished["result"]["status"] == 200
        assert finished["result"]["body"] == '{"answer": 42}'
        assert finished["attempts"] == 1
        records = await attempts(client, auth_headers, task["id"])
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in records] == [
        (1, "waiting", 202),
        (1, "completed", 200),
    ]
    assert len(target.to("/jobs")) == 1  # the original request was made once
    assert len(target.to("/jobs/7/status")) == 2
    polls = target.to("/jobs/7/status")
    assert polls[1].at - polls[0].at >= 0.95  # Retry-After: 1 honoured between polls
    assert all(p.headers["webhook-id"] == task["id"] for p in polls)  # polls are signed too


async def test_a_waiting_task_gives_up_at_its_deadline_and_a_cancelled_one_stays_cancelled(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    async_job(target, polls_before_done=1000)
    app = await serving(**{**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2})
    client = app.test_client()
    payload = {"url": target.url("/jobs"), "follow_async": True, "async_deadline_s": 2}
    expiring = await enqueue(client, auth_headers, kind="http", payload=payload)
    cancelled = await enqueue(client, auth_headers, kind="http", payload={**payload, "async_deadline_s": 60})
    await eventually(lambda: _status_is(client, auth_headers, cancelled["id"], "waiting"))
    assert (
        await (await client.post(f"/api/tasks/{cancelled['id']}/cancel", headers=auth_headers)).get_json()
    )["status"] == "cancelled"
    finished = await done(client, auth_headers, expiring["id"])
    assert finished["status"] == "discarded"
    assert "no final answer" in finished["last_error"]
    await asyncio.sleep(1.5)  # polls keep running for other tasks; the cancelled one is left alone
    still = await (await client.get(f"/api/tasks/{cancelled['id']}", headers=auth_headers)).get_json()
    assert still["status"] == "cancelled"


async def _status_is(client: Any, headers: dict[str, str], task_id: str, status: str) -> bool:
    task = await (await client.get(f"/api/tasks/{task_id}", headers=headers)).get_json()
    return bool(task["status"] == status)


async def test_a_failing_host_opens_its_circuit_then_a_probe_closes_it(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    down = answer(503, "down")
    target.routes["/fragile"] = in_order(down, down, down, answer(200, "back"))
    app = await serving(**WORKER, HTTP_CIRCUIT_FAILURES=2, HTTP_CIRCUIT_COOLDOWN_S=1.5)
    client = app.test_client()
    await client.put(
        "/api/queues/fragile", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    task = await enqueue(
        client, auth_headers, kind="http", queue="fragile", payload={"url": target.url("/fragile")}
    )
    host = f'host="127.0.0.1:{target.port}"'
    await eventually(lambda: _metric(client, f"taskgate_http_host_unhealthy{{{host}}} 1.0"))
    finished = await done(client, auth_headers, task["id"])
    assert finished["status"] == "completed"
    # deferrals while the circuit was open spent no attempts: 3 failures and the successful probe
    assert finished["attempts"] == 4
    records = await attempts(client, auth_headers, task["id"])
    assert [a["http_status"] for a in records] == [503, 503, 503, 200]
    starts = [datetime.fromisoformat(a["started_at"]) for a in records]
    ends = [datetime.fromisoformat(a["finished_at"]) for a in records]
    for i in (2, 3):  # after the 2nd and 3rd failure the host was left alone for the cool-down
        assert (starts[i] - ends[i - 1]).total_seconds() >= 1.4
    assert len(target.to("/fragile")) == 4
    await eventually(lambda: _metric(client, f"taskgate_http_host_unhealthy{{{host}}} 0.0"))
    assert await _metric(client, f'taskgate_http_deliveries_total{{{host},outcome="deferred"}}')


async def _metric(client: Any, text: str) -> bool:
    return text in await (await client.get("/metrics")).get_data(as_text=True)


async def test_the_host_limit_holds_across_two_worker_processes(
    serving: Serving,
    auth_headers: dict[str, str],
    api_client: Any,
    secret_keys: list[str],
    clean_database: str,
    tmp_path: Path,
    target: Target,
) -> None:
    in_flight = [0, 0]  # now, most ever

    async def slow(request: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(0.15)
        finally:
            in_flight[0] -= 1
        return web.Response(text="ok")

    target.routes["/limited"] = slow
    app = await serving(ROLES=["api"], HTTP_ALLOWED_NETWORKS=LOOPBACK)
    client = app.test_client()
    env = {
        "HTTP_ALLOWED_NETWORKS": "127.0.0.0/8",
        "HTTP_HOST_MAX_CONCURRENCY": "2",
        "WORKER_CONCURRENCY": "8",
        "SECRET_KEYS": ",".join(secret_keys),  # workers decrypt the client's signing secrets
    }
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}", **env) for i in range(2)]
    try:
        await started(*workers)
        response = await client.post(
            "/api/tasks/batch",
            json={"tasks": [{"kind": "http", "payload": {"url": target.url("/limited")}}] * 24},
            headers=auth_headers,
        )
        assert response.status_code == 201

        async def all_completed() -> bool:
            rows = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE status = 'completed'")
            return bool(rows[0]["n"] == 24)

        await eventually(all_completed, timeout=90)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        exit_codes = [worker.wait(timeout=30) for worker in workers]
    assert exit_codes == [0, 0]
    assert len(target.to("/limited")) == 24
    assert in_flight[1] == 2  # reached, never exceeded
    rows = await fetch(clean_database, "SELECT max(attempts) AS most FROM tasks")
    assert rows[0]["most"] == 1  # waiting for a permit spent no attempt
    held = await fetch(clean_database, "SELECT count(*) AS n FROM http_host_permits WHERE holder IS NOT NULL")
    assert held[0]["n"] == 0  # every permit was given back
    listed = await client.get(
        f"/api/auth/clients/{api_client.client_id}/signing-secrets", headers=auth_headers
    )
    [secret] = [item["secret"] for item in (await listed.get_json())["items"]]
    for request in target.to("/limited"):  # signed in the worker processes with the client's secret
        assert Webhook(secret).verify(request.body, request.headers, json_parse=False) is None


async def test_every_replica_reports_unhealthy_hosts_from_the_database(
    serving: Serving, clean_database: str
) -> None:
    # another process saw these failures; this replica learns them from PostgreSQL
    await fetch(
        clean_database,
        "INSERT INTO http_hosts (host, consecutive_failures, opened_until) "
        "VALUES ('down.example:443', 5, now() + interval '1 minute'), ('flaky.example:443', 1, NULL)",
    )
    app = await serving(ROLES=["api", "scheduler"])
    client = app.test_client()
    await eventually(lambda: _metric(client, 'taskgate_http_host_unhealthy{host="down.example:443"} 1.0'))
    assert await _metric(client, 'taskgate_http_host_unhealthy{host="flaky.example:443"} 0.0')


async def test_a_poll_cut_short_by_shutdown_is_handed_back_at_once(
    settings: Settings, clean_database: str, auth_headers: dict[str, str], target: Target
) -> None:
    from quart.testing.app import TestApp

    target.routes["/jobs"] = answer(202, Location="/jobs/7/status", **{"Retry-After": "0"})

    release = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        # outlasts the scheduler's shutdown grace: the poll is cancelled
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), timeout=30)
        return web.Response(status=202)

    target.routes["/jobs/7/status"] = hang
    app = create_app(settings.model_copy(update={**WORKER, "ROLES": ["api", "worker", "scheduler"]}))
    async with TestApp(app, shutdown_timeout=30):
        client = app.test_client()
        payload = {"url": target.url("/jobs"), "follow_async": True, "timeout_s": 60}
        task = await enqueue(client, auth_headers, kind="http", payload=payload)
        await eventually(lambda: len(target.to("/jobs/7/status")) == 1)
        [claimed] = await fetch(
            clean_database, "SELECT run_at > now() + interval '60 s' AS leased FROM tasks"
        )
        assert claimed["leased"]  # the poll holds the task (two timeouts plus a margin)
    [row] = await fetch(
        clean_database, "SELECT status, run_at <= now() AS due FROM tasks WHERE id = $1", UUID(task["id"])
    )
    release.set()
    assert (row["status"], row["due"]) == ("waiting", True)  # due again now, not in two minutes


async def test_rescuing_a_killed_workers_lease_frees_its_host_permits(
    serving: Serving,
    auth_headers: dict[str, str],
    secret_keys: list[str],
    clean_database: str,
    tmp_path: Path,
    target: Target,
) -> None:
    calls = [0]
    done = asyncio.Event()

    async def hangs_once(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] == 1:
            # the victim's request: it dies holding the host's only permit
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=60)
        return web.Response(text="ok")

    target.routes["/hang"] = hangs_once
    target.routes["/quick"] = lambda request: _ok()
    # the lease rescuer runs here; the workers are real processes
    app = await serving(ROLES=["api", "scheduler"], HTTP_ALLOWED_NETWORKS=LOOPBACK, LEASE_SECONDS=2)
    client = app.test_client()
    await client.put("/api/queues/default", json={"min_backoff_s": 0.1}, headers=auth_headers)
    env = {
        "HTTP_ALLOWED_NETWORKS": "127.0.0.0/8",
        "HTTP_HOST_MAX_CONCURRENCY": "1",
        "LEASE_SECONDS": "2",
        "SECRET_KEYS": ",".join(secret_keys),
    }
    victim = spawn_worker(clean_database, tmp_path / "victim", **env)
    try:
        await started(victim)
        hanging = await client.post(
            "/api/tasks",
            json={"kind": "http", "payload": {"url": target.url("/hang"), "timeout_s": 60}},
            headers=auth_headers,
        )
        hanging_id = UUID((await hanging.get_json())["id"])
        await eventually(lambda: target.to("/hang"), timeout=30)
        [held] = await fetch(clean_database, "SELECT expires_at - now() AS left FROM http_host_permits")
        assert held["left"].total_seconds() > 60  # the permit's own lease: timeout_s + 13 s
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)

        async def permit_freed() -> bool:
            rows = await fetch(
                clean_database, "SELECT count(*) AS n FROM http_host_permits WHERE expires_at > now()"
            )
            return bool(rows[0]["n"] == 0)

        # freed with the rescue of the lease (2 s), not 60 s later when the permit's lease ends
        await eventually(permit_freed, timeout=15)
        [task] = await fetch(clean_database, "SELECT status FROM tasks WHERE id = $1", hanging_id)
        assert task["status"] != "running"
        quick = await client.post(
            "/api/tasks",
            json={"kind": "http", "payload": {"url": target.url("/quick")}},
            headers=auth_headers,
        )
        quick_id = UUID((await quick.get_json())["id"])
        # the survivor: a worker in this process, under the same one-permit limit
        await serving(
            ROLES=["worker"], HTTP_ALLOWED_NETWORKS=LOOPBACK, HTTP_HOST_MAX_CONCURRENCY=1, LEASE_SECONDS=2
        )

        async def both_completed() -> bool:
            rows = await fetch(
                clean_database,
                "SELECT count(*) AS n FROM tasks WHERE status = 'completed' AND id = ANY($1)",
                [hanging_id, quick_id],
            )
            return bool(rows[0]["n"] == 2)

        await eventually(both_completed, timeout=30)
    finally:
        done.set()
        if victim.poll() is None:
            victim.kill()
        victim.wait(timeout=10)
    attempts = await fetch(
        clean_database, "SELECT outcome FROM task_attempts WHERE task_id = $1 ORDER BY id", hanging_id
    )
    assert [a["outcome"] for a in attempts] == ["lost", "completed"]
    assert len(target.to("/quick")) == 1


async def _ok() -> web.StreamResponse:
    return web.Response(text="ok")


async def test_a_status_answer_whose_location_is_not_a_url_ends_the_wait(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """The same Location on the first request discards the task; on a poll it failed the poll,
    which was tried again after every lease, past the task's deadline, for ever."""
    target.routes["/jobs"] = answer(202, Location="/jobs/8/status", **{"Retry-After": "1"})
    target.routes["/jobs/8/status"] = answer(202, Location="http://a:99999/x")
    app = await serving(**{**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2})
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/jobs"), "follow_async": True}
    )
    finished = await done(client, auth_headers, task["id"], wait=15)
    assert finished["status"] == "discarded", finished
    assert "Location" in finished["last_error"]
    assert len(target.to("/jobs/8/status")) == 1


async def test_a_location_that_is_not_an_http_url_ends_the_wait_and_the_redirect(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """A Location such as `mailto:` joins to a URL without a host: the poller stored it as the
    status URL and failed every poll on it (past the deadline, for ever); a redirect to it raised
    out of the client as a bare ValueError (retried as a crash instead of discarded). A host no
    name lookup can take (an empty or over-long label) raised UnicodeError the same way."""
    target.routes["/jobs"] = answer(202, Location="mailto:ops@example.com")
    target.routes["/later"] = answer(202, Location="/later/status", **{"Retry-After": "1"})
    target.routes["/later/status"] = answer(202, Location="urn:job:9")
    target.routes["/moved"] = answer(302, Location="mailto:ops@example.com")
    target.routes["/moved-to-no-name"] = answer(302, Location="http://a..example.com/")
    app = await serving(**{**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2})
    client = app.test_client()
    accepted = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/jobs"), "follow_async": True, "async_deadline_s": 600},
    )
    polled = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/later"), "follow_async": True, "async_deadline_s": 600},
    )
    moved = await enqueue(
        client, auth_headers, kind="http", payload={"url": target.url("/moved"), "follow_redirects": True}
    )
    unnamed = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/moved-to-no-name"), "follow_redirects": True},
    )
    for task_id in (accepted["id"], polled["id"], moved["id"], unnamed["id"]):
        finished = await done(client, auth_headers, task_id, wait=15)
        assert (finished["status"], finished["attempts"]) == ("discarded", 1), finished
        assert "Location" in finished["last_error"], finished["last_error"]
    assert len(target.to("/later/status")) == 1


@contextlib.asynccontextmanager
async def raw_target(answer: bytes) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that answers every request with these exact bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_response_header_that_is_not_utf8_is_kept_readable(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """A Latin-1 header value (an old server's Content-Disposition) reached the result as lone
    surrogates, which jsonb refuses: the completion could not be written and the task, delivered
    and answered 200, never completed (rescued, delivered again, until its attempts ran out). A
    reason phrase in Latin-1 failed the same way in last_error."""
    answer_bytes = (
        b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="caf\xe9.txt"\r\n'
        b"Content-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    async with raw_target(answer_bytes) as port:
        app = await serving(**WORKER)
        client = app.test_client()
        task = await enqueue(client, auth_headers, kind="http", payload={"url": f"http://127.0.0.1:{port}/"})
        finished = await done(client, auth_headers, task["id"], wait=15)
    assert (finished["status"], finished["attempts"]) == ("completed", 1), finished
    assert finished["result"]["headers"]["Content-Disposition"] == 'attachment; filename="caf\ufffd.txt"'
    refused = b"HTTP/1.1 400 Requ\xeate invalide\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    async with raw_target(refused) as port:
        task = await enqueue(client, auth_headers, kind="http", payload={"url": f"http://127.0.0.1:{port}/"})
        finished = await done(client, auth_headers, task["id"], wait=15)
    assert (finished["status"], finished["attempts"]) == ("discarded", 1), finished
    assert "HTTP 400 Requ\ufffdte invalide" in finished["last_error"]


async def test_a_status_url_failing_with_a_latin1_reason_still_ends_at_the_deadline(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """The poller kept the failed poll's reason in the task's wait state (jsonb): a reason phrase
    in Latin-1 made every poll fail to write, so the task stayed waiting past its deadline."""
    failing = b"HTTP/1.1 503 Indisponible \xe9\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    async with raw_target(failing) as port:
        target.routes["/jobs"] = answer(202, Location=f"http://127.0.0.1:{port}/status")
        roles = {**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2}
        app = await serving(**roles)
        client = app.test_client()
        task = await enqueue(
            client,
            auth_headers,
            kind="http",
            payload={"url": target.url("/jobs"), "follow_async": True, "async_deadline_s": 3},
        )
        finished = await done(client, auth_headers, task["id"], wait=20)
    assert finished["status"] == "discarded", finished
    assert "no final answer" in finished["last_error"]
    assert "HTTP 503 Indisponible \ufffd" in finished["last_error"]


async def test_a_waiting_task_whose_every_poll_fails_unexpectedly_still_ends_at_its_deadline(
    serving: Serving, auth_headers: dict[str, str], target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline was enforced only on the paths a poll ends normally: a poll that raised (each
    of the three Location and encoding defects before) was tried again after every lease, for ever."""
    from app.src.api.http import poller

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in judging the status answer")

    monkeypatch.setattr(poller, "judge_status", broken)
    async_job(target, polls_before_done=1000)
    app = await serving(**{**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2})
    client = app.test_client()
    task = await enqueue(
        client,
        auth_headers,
        kind="http",
        payload={"url": target.url("/jobs"), "follow_async": True, "async_deadline_s": 0.5},
    )
    finished = await done(client, auth_headers, task["id"], wait=20)
    assert finished["status"] == "discarded", finished
    assert "no final answer" in finished["last_error"]
    assert "a bug in judging the status answer" in finished["last_error"]


async def test_a_redirect_to_another_host_waits_for_that_hosts_permit(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """A followed redirect was sent under the first host's permit only: with a limit of one, a
    host reached both directly and through a redirect from another host served two at once."""
    running = {"now": 0, "max": 0}

    async def slow(request: web.Request) -> web.StreamResponse:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await asyncio.sleep(1)
        running["now"] -= 1
        return web.Response(text="ok")

    target.routes["/slow"] = slow
    # 127.0.0.1:port and localhost:port are two destinations (host keys) of one server
    target.routes["/hop"] = answer(307, Location=target.url("/slow", host="localhost"))
    app = await serving(**WORKER, HTTP_HOST_MAX_CONCURRENCY=1, HTTP_HOST_PERMIT_WAIT_S=10)
    client = app.test_client()
    direct = {"url": target.url("/slow", host="localhost")}
    redirected = {"url": target.url("/hop"), "follow_redirects": True}
    tasks = [await enqueue(client, auth_headers, kind="http", payload=p) for p in (direct, redirected) * 2]
    for task in tasks:
        finished = await done(client, auth_headers, task["id"])
        assert finished["status"] == "completed", finished
        assert finished["result"]["body"] == "ok"
    assert len(target.to("/slow")) == 4
    assert running["max"] == 1


async def test_a_retry_after_date_no_datetime_holds_is_read_as_absent(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """email.utils raises OverflowError, not ValueError, for a date whose year or offset no C
    integer holds: the answer was never judged. A 202 + Location with such a Retry-After failed
    the attempt as a crash, so the original request was sent again (a second job at the
    provider) instead of waiting; a 503 with one was recorded without its status, and its host's
    circuit and adaptive limit never saw the failure."""
    huge = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"
    target.routes["/jobs"] = answer(202, Location="/jobs/9/status", **{"Retry-After": huge})
    target.routes["/jobs/9/status"] = answer(202, **{"Retry-After": "60"})
    target.routes["/busy"] = answer(503, "busy", **{"Retry-After": huge})
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/quick", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    accepted = await enqueue(
        client,
        auth_headers,
        kind="http",
        queue="quick",
        max_attempts=2,
        payload={"url": target.url("/jobs"), "follow_async": True},
    )
    busy = await enqueue(
        client, auth_headers, kind="http", queue="quick", max_attempts=2, payload={"url": target.url("/busy")}
    )
    finished = await done(client, auth_headers, busy["id"], wait=15)
    assert finished["status"] == "discarded", finished
    records = await attempts(client, auth_headers, busy["id"])
    assert [(a["outcome"], a["http_status"]) for a in records] == [("failed", 503)] * 2, records
    assert all(a["error"].startswith("HTTP 503") for a in records), records
    await eventually(lambda: _status_is(client, auth_headers, accepted["id"], "waiting"))
    records = await attempts(client, auth_headers, accepted["id"])
    assert [(a["outcome"], a["http_status"]) for a in records] == [("waiting", 202)], records
    assert len(target.to("/jobs")) == 1  # the provider was asked once


async def test_a_status_url_that_hangs_does_not_hold_up_other_tasks_polls(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """A poll run waited for every poll it started, and the job is elected cluster-wide: one
    status URL that answered no sooner than its task's timeout_s (up to 900 s, twice: status and
    result) stopped every other waiting task of every tenant from being polled until it timed out,
    and turned every replica unready (the job had no success for 30 s)."""
    release = asyncio.Event()

    async def hanging(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=202)

    target.routes["/slow-jobs"] = answer(202, Location="/slow-jobs/status", **{"Retry-After": "0"})
    target.routes["/slow-jobs/status"] = hanging
    async_job(target, polls_before_done=0)
    roles = {**WORKER, "ROLES": ["api", "worker", "scheduler"], "HTTP_POLL_INTERVAL_S": 0.2}
    app = await serving(**roles)
    client = app.test_client()
    try:
        stuck = await enqueue(
            client,
            auth_headers,
            kind="http",
            payload={"url": target.url("/slow-jobs"), "follow_async": True, "timeout_s": 120},
        )
        await eventually(lambda: target.to("/slow-jobs/status"))  # its poll is in flight, hanging
        other = await enqueue(
            client,
            auth_headers,
            kind="http",
            payload={"url": target.url("/jobs", host="localhost"), "follow_async": True},
        )
        finished = await done(client, auth_headers, other["id"], wait=15)
        assert finished["status"] == "completed", finished
        assert not release.is_set()  # decided while the other poll still hung
        ready = await (await client.get("/api/common/ready")).get_json()
        assert ready["ready"] is True, ready
        assert (await fetch_status(client, auth_headers, stuck["id"])) == "waiting"
    finally:
        release.set()


async def fetch_status(client: Any, headers: dict[str, str], task_id: str) -> str:
    task = await (await client.get(f"/api/tasks/{task_id}", headers=headers)).get_json()
    return str(task["status"])


async def test_a_full_connection_pool_is_no_failure_of_the_host_that_waited_for_it(
    serving: Serving, auth_headers: dict[str, str], target: Target
) -> None:
    """Waiting for a free connection of the process's pool (HTTP_MAX_CONNECTIONS) counted in
    aiohttp's connect timeout: while slow requests to one host held every connection, a request
    to a healthy host timed out before it was sent, and was recorded as that host failing (an
    attempt spent, its circuit opened, its limit halved)."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), timeout=3)
        return web.Response(text="slow")

    target.routes["/slow"] = slow
    target.routes["/quick"] = answer(200, "quick")
    app = await serving(**WORKER, HTTP_MAX_CONNECTIONS=1, HTTP_CONNECT_TIMEOUT_S=0.5, HTTP_CIRCUIT_FAILURES=1)
    client = app.test_client()
    try:
        slow_task = await enqueue(
            client, auth_headers, kind="http", payload={"url": target.url("/slow"), "timeout_s": 10}
        )
        await eventually(lambda: target.to("/slow"))  # it holds the process's only connection
        # another destination (localhost:port), healthy
        quick = await enqueue(
            client, auth_headers, kind="http", payload={"url": target.url("/quick", host="localhost")}
        )
        finished = await done(client, auth_headers, quick["id"], wait=20)
    finally:
        release.set()
    assert finished["status"] == "completed", finished
    records = await attempts(client, auth_headers, quick["id"])
    assert [(a["outcome"], a["http_status"]) for a in records] == [("completed", 200)], records
    host = f'host="localhost:{target.port}"'
    assert not await _metric(client, f"taskgate_http_host_unhealthy{{{host}}} 1.0")
    assert (await done(client, auth_headers, slow_task["id"]))["status"] == "completed"


async def test_lookups_a_dns_server_leaves_unanswered_do_not_fail_other_hosts(
    serving: Serving, auth_headers: dict[str, str], target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Name lookups ran on the event loop's default executor (6 threads on 2 cores): a tenant's
    names whose DNS server never answers held them all, and a healthy host's lookup queued behind
    them inside its connect timeout, timed out unsent and was recorded as that host failing (an
    attempt spent, its circuit opened)."""
    real = socket.getaddrinfo
    release = threading.Event()
    hanging = [0]

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".unanswered.test"):  # a DNS server that never answers
            hanging[0] += 1
            release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    target.routes["/quick"] = answer(200, "quick")
    app = await serving(**WORKER, HTTP_CONNECT_TIMEOUT_S=1, HTTP_CIRCUIT_FAILURES=1)
    client = app.test_client()
    try:
        for i in range(8):
            url = f"http://h{i}.unanswered.test:{target.port}/x"
            await enqueue(client, auth_headers, kind="http", payload={"url": url})
        await eventually(lambda: hanging[0] >= 6)
        quick = await enqueue(
            client, auth_headers, kind="http", payload={"url": target.url("/quick", host="localhost")}
        )
        finished = await done(client, auth_headers, quick["id"], wait=15)
    finally:
        release.set()
    assert finished["status"] == "completed", finished
    records = await attempts(client, auth_headers, quick["id"])
    assert [(a["outcome"], a["http_status"]) for a in records] == [("completed", 200)], records
