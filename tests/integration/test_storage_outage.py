"""PostgreSQL out of reach: every API answer is 503 problem+json with Retry-After within 5 s.

The app talks to PostgreSQL through the tests' TCP proxy (tests/proxy.py), which can refuse (close
every connection and stop listening, as a stopped server does) or freeze (keep every connection
open and forward nothing, as a frozen network does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.database import Database, StorageUnavailable
from app.src.api.auth import operators
from app.src.api.models.auth import NewOperator
from app.ui import session
from tests.conftest import bearer
from tests.proxy import TcpProxy

PROBLEM = "application/problem+json"
ANSWER_WITHIN_S = 5.0


@pytest.fixture
async def proxy(clean_database: str) -> AsyncIterator[TcpProxy]:
    forwarding = TcpProxy.to_database(clean_database)
    await forwarding.start()
    try:
        yield forwarding
    finally:
        await forwarding.close()


async def timed(call: Any) -> tuple[Any, float]:
    began = time.monotonic()
    response = await asyncio.wait_for(call, timeout=ANSWER_WITHIN_S + 5)
    return response, time.monotonic() - began


async def assert_unavailable(client: Any, headers: dict[str, str], task_id: str) -> None:
    """Enqueue, read and list all answer 503 + Retry-After problem+json within 5 s."""
    calls = [
        client.post("/api/tasks", json={"kind": "noop"}, headers=headers),
        client.post("/api/tasks/batch", json={"tasks": [{"kind": "noop"}] * 2}, headers=headers),
        client.get(f"/api/tasks/{task_id}", headers=headers),
        client.get("/api/tasks", headers=headers),
    ]
    # all at once, each timed on its own: the same promise per call, one wait instead of four
    timings = await asyncio.gather(*(timed(call) for call in calls))
    for response, elapsed in timings:
        assert response.status_code == 503, await response.get_data()
        assert int(response.headers["Retry-After"]) >= 1
        assert response.mimetype == PROBLEM
        assert elapsed < ANSWER_WITHIN_S, elapsed
    ready, elapsed = await timed(client.get("/api/common/ready"))
    assert ready.status_code == 503
    assert (await ready.get_json())["ready"] is False
    assert elapsed < 2.5, elapsed


async def assert_transaction_unavailable(db: Database) -> None:
    """SQLAlchemy's way in (`transaction()`) raises the same StorageUnavailable, as quickly."""
    began = time.monotonic()
    with pytest.raises(StorageUnavailable):
        async with db.transaction() as conn:
            await conn.exec_driver_sql("SELECT 1")
    assert time.monotonic() - began < ANSWER_WITHIN_S


async def test_every_connection_carries_the_server_side_statement_timeout(db: Database) -> None:
    async with db.driver() as conn:
        assert await conn.fetchval("SHOW statement_timeout") == "5s"
    async with db.transaction() as conn:
        assert (await conn.exec_driver_sql("SHOW statement_timeout")).scalar() == "5s"


async def test_an_sql_error_passes_through_unchanged(db: Database) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        async with db.driver() as conn:
            await conn.fetch("SELECT * FROM no_such_table")


async def test_a_refused_database_is_503_with_retry_after_and_recovers(
    serving: Any, proxy: TcpProxy, auth_headers: dict[str, str]
) -> None:
    app = await serving(DB_URI=proxy.uri, ROLES=["api"])
    client = app.test_client()
    notifier = app.extensions["taskgate"].notifier
    first = await client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
    assert first.status_code == 201
    task_id = (await first.get_json())["id"]

    proxy.refuse()
    await assert_unavailable(client, auth_headers, task_id)
    assert not notifier.connected.is_set()
    await assert_transaction_unavailable(app.extensions["taskgate"].db)

    await proxy.start()  # the database is back, on the same address
    back = time.monotonic()
    await asyncio.wait_for(notifier.connected.wait(), timeout=5)
    assert time.monotonic() - back < 2.0  # LISTEN again about a second after, not after 30 s
    deadline = time.monotonic() + 5
    while True:
        again = await client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
        if again.status_code == 201 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert again.status_code == 201


async def test_a_stalled_database_is_503_with_retry_after_not_a_hang(
    serving: Any, proxy: TcpProxy, auth_headers: dict[str, str]
) -> None:
    app = await serving(DB_URI=proxy.uri, ROLES=["api"])
    client = app.test_client()
    first = await client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
    assert first.status_code == 201
    task_id = (await first.get_json())["id"]

    async with app.extensions["taskgate"].db.transaction() as conn:  # a pooled SQLAlchemy connection
        await conn.exec_driver_sql("SELECT 1")

    proxy.freeze()
    await assert_unavailable(client, auth_headers, task_id)
    await assert_transaction_unavailable(app.extensions["taskgate"].db)
    # requests arriving while a stalled insert batch is in flight do not queue behind it
    began = time.monotonic()
    answers = await asyncio.gather(
        *(client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers) for _ in range(20))
    )
    assert {a.status_code for a in answers} == {503}
    assert time.monotonic() - began < ANSWER_WITHIN_S
    proxy.refuse()  # let the app shut down without waiting on the frozen connections


async def test_a_request_ended_by_a_deadlock_is_a_503_and_changes_nothing(
    client: Any, auth_headers: dict[str, str], clean_database: str
) -> None:
    """PostgreSQL breaks a deadlock (or a serialization conflict) by ending one transaction: that
    is contention, not a fault of the request, and a retry succeeds. It was a 500."""
    conn = await asyncpg.connect(clean_database.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await conn.execute(
            """CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'deadlock_detected'; END $$"""
        )
        await conn.execute(
            "CREATE TRIGGER conflict BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION conflict()"
        )
        for path, body in (
            ("/api/tasks", {"kind": "noop"}),
            ("/api/tasks/batch", {"tasks": [{"kind": "noop"}] * 3}),
        ):
            refused = await client.post(path, json=body, headers=auth_headers)
            assert refused.status_code == 503, await refused.get_data()
            assert refused.mimetype == PROBLEM
            assert int(refused.headers["Retry-After"]) >= 1
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
        await conn.execute("DROP TRIGGER conflict ON tasks")
        retried = await client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
        assert retried.status_code == 201
    finally:
        await conn.execute("DROP TRIGGER IF EXISTS conflict ON tasks")
        await conn.execute("DROP FUNCTION IF EXISTS conflict()")
        await conn.close()


async def test_a_console_cookie_left_idle_during_an_outage_is_a_503_not_a_500(
    serving: Any, proxy: TcpProxy, db: Database, operator: NewOperator
) -> None:
    """A genuine cookie left idle too long ends its session, which reads and writes PostgreSQL: that
    ran in the error handler of the redirect to the login page, where an error is answered 500."""
    app = await serving(DB_URI=proxy.uri, ROLES=["api"])
    grant = await operators.start_session(db, user_id=operator.user_id)
    async with app.app_context():
        idle = session.pack(
            session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp())),
            now=time.time() - session.IDLE_TIMEOUT_S - 5,
        )
    cookie = {"Cookie": f"{session.SESSION_COOKIE}={idle}"}
    client = app.test_client(use_cookies=False)

    proxy.refuse()
    response, elapsed = await timed(client.get("/ui/", headers=cookie, scheme="https"))
    assert response.status_code == 503, await response.get_data()
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < ANSWER_WITHIN_S

    await proxy.start()  # once it is back, the idle cookie still ends its session for good
    deadline = time.monotonic() + 5
    while (fresh := await client.get("/ui/", headers=cookie, scheme="https")).status_code == 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert fresh.status_code == 303
    assert fresh.headers["Location"].startswith("/ui/login")
    me = await app.test_client().get("/api/auth/me", headers=bearer(grant.access_token))
    assert me.status_code == 401


async def _follow_until_the_database_goes(
    app: Any, proxy: TcpProxy, path: str, headers: dict[str, str]
) -> bytes:
    """What an open event stream sends once PostgreSQL goes away under it; it must end by itself."""
    client = app.test_client(use_cookies=False)
    async with client.request(path, headers=headers, scheme="https") as stream:
        await stream.send_complete()
        assert b"event: task" in await asyncio.wait_for(stream.receive(), 5)
        proxy.refuse()
    return bytes(stream.response_data)


async def test_an_open_event_stream_ends_with_a_reconnect_hint_when_the_database_goes(
    serving: Any, proxy: TcpProxy, db: Database, operator: NewOperator, auth_headers: dict[str, str]
) -> None:
    """A stream answers 200 before PostgreSQL goes, so no 503 can follow: its read raised out of
    the application (an error logged, the connection cut mid-body, the browser's EventSource told
    nothing about when to come back). It ends instead with the SSE `retry` field."""
    app = await serving(DB_URI=proxy.uri, ROLES=["api"])
    client = app.test_client()
    created = await client.post(
        "/api/tasks", json={"kind": "noop", "queue": "unserved"}, headers=auth_headers
    )
    task_id = (await created.get_json())["id"]
    grant = await operators.start_session(db, user_id=operator.user_id)
    async with app.app_context():
        cookie = session.pack(session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp())))

    for path, headers in (
        (f"/api/tasks/{task_id}/events", auth_headers),
        (f"/ui/tasks/{task_id}/events", {"Cookie": f"{session.SESSION_COOKIE}={cookie}"}),
    ):
        began = time.monotonic()
        tail = await asyncio.wait_for(_follow_until_the_database_goes(app, proxy, path, headers), 15)
        assert time.monotonic() - began < ANSWER_WITHIN_S + 5  # a stream's reads wait up to ~5 s
        assert tail.endswith(b'retry: 1000\nevent: unavailable\ndata: {"retry_after_s": 1}\n\n'), tail
        await proxy.start()
        deadline = time.monotonic() + 5
        while (await client.get(f"/api/tasks/{task_id}", headers=auth_headers)).status_code == 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
