"""The SDK client against the real server over HTTPS: an enqueue whose answer is lost (a read
timeout, a dropped connection) after it reached the server is sent again under its
Idempotency-Key and makes one task; one sent without a key is never sent again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import httpx
import pytest

from app.database import Database
from tests.conftest import ROOT, driver_uri, make_client
from tests.e2e.conftest import ServerProcess, start_server
from tests.proxy import TcpProxy
from tests.task_harness import eventually, fetch

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def inserts_held(database_uri: str) -> AsyncIterator[asyncpg.Connection]:
    """While open, every INSERT into `tasks` waits (a SHARE lock held by this transaction): the
    enqueue has reached the server and PostgreSQL, and its answer is not written yet."""
    conn = await asyncpg.connect(driver_uri(database_uri))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE tasks IN SHARE MODE")
            yield conn
    finally:
        await conn.close()


async def an_insert_waits(database_uri: str) -> None:
    async def waiting() -> bool:
        rows = await fetch(
            database_uri,
            "SELECT count(*) AS n FROM pg_locks WHERE NOT granted AND relation = 'tasks'::regclass",
        )
        return bool(rows[0]["n"])

    await eventually(waiting, timeout=20, interval=0.02)


async def tasks_of(database_uri: str, client_id: object) -> list[str]:
    rows = await fetch(database_uri, "SELECT id FROM tasks WHERE client_id = $1", client_id)
    return [str(r["id"]) for r in rows]


def sdk_client(server: ServerProcess, key: str, base_url: str | None = None) -> taskgate.Client:
    ca = str(server.data_dir / "tls" / "cert.pem")
    return taskgate.Client(base_url or server.base_url, api_key=key, verify=ca, timeout_s=1.0)


async def test_an_enqueue_with_a_key_is_sent_again_after_a_read_timeout_and_makes_one_task(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A read timeout ended `enqueue` with httpx.ReadTimeout although the request had reached the
    server (which may store the task) and sending it again under its key is safe."""
    issued = await make_client(db, "resend")
    with sdk_client(server, issued.api_key) as tg:
        async with inserts_held(clean_database):
            sent = asyncio.create_task(asyncio.to_thread(tg.enqueue, "noop", {}, idempotency_key="order-1"))
            await an_insert_waits(clean_database)
            await asyncio.sleep(1.5)  # past the client's 1 s read timeout
            assert not sent.done()  # sent again, not given up
        task = await asyncio.wait_for(sent, 30)
    assert await tasks_of(clean_database, issued.client_id) == [str(task.id)]


async def test_an_enqueue_without_a_key_is_never_sent_again_after_it_reached_the_server(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    issued = await make_client(db, "no resend")
    with sdk_client(server, issued.api_key) as tg:
        async with inserts_held(clean_database):
            sent = asyncio.create_task(asyncio.to_thread(tg.enqueue, "noop", {}, idempotent=False))
            await an_insert_waits(clean_database)
            with pytest.raises(httpx.ReadTimeout):
                await asyncio.wait_for(sent, 10)
        await asyncio.sleep(1.0)  # what the server still does with the request
    assert len(await tasks_of(clean_database, issued.client_id)) <= 1  # never two


async def test_an_async_enqueue_with_a_key_is_sent_again_after_its_connection_dropped(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A connection cut while the server worked on an enqueue (a proxy or load balancer going
    away) ended `AsyncClient.enqueue` with a ReadError / RemoteProtocolError."""
    issued = await make_client(db, "dropped")
    port = urlsplit(server.base_url).port
    assert port is not None
    proxy = TcpProxy(port=port)
    await proxy.start()
    ca = str(server.data_dir / "tls" / "cert.pem")
    try:
        async with taskgate.AsyncClient(
            f"https://localhost:{proxy.port}", api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            async with inserts_held(clean_database):
                sent = asyncio.create_task(tg.enqueue("noop", {}, idempotency_key="order-2"))
                await an_insert_waits(clean_database)
                proxy.refuse()  # every connection through it cut; then it listens again
                await proxy.start()
                await asyncio.sleep(0.5)
                assert not sent.done(), sent.exception()
            task = await asyncio.wait_for(sent, 30)
    finally:
        await proxy.close()
    assert await tasks_of(clean_database, issued.client_id) == [str(task.id)]


async def test_an_enqueue_whose_key_is_still_in_flight_is_sent_again_when_the_first_is_done(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A repeat sent while the first request of its key is still being stored is answered 409
    idempotency-in-flight ("retry shortly"): `enqueue` raised it instead of retrying shortly."""
    issued = await make_client(db, "in flight")
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        with sdk_client(server, issued.api_key) as tg:
            async with conn.transaction():  # the key's lock, as its first request holds it
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2, 7))",
                    str(issued.client_id),
                    "order-3",
                )
                sent = asyncio.create_task(
                    asyncio.to_thread(tg.enqueue, "noop", {}, idempotency_key="order-3")
                )
                await asyncio.sleep(0.5)  # the first retries (each backs off at least 0.1 s) refused
                assert not sent.done(), sent.exception()
                assert await tasks_of(clean_database, issued.client_id) == []
            task = await asyncio.wait_for(sent, 30)
    finally:
        await conn.close()
    assert await tasks_of(clean_database, issued.client_id) == [str(task.id)]


async def test_a_completion_sent_again_tells_what_its_first_send_wrote_from_lost_leases(
    server: ServerProcess, db: Database, clean_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A complete request answered 503 (past the server's 10 s deadline) or whose answer was lost is
    sent again; the items its first send wrote come back `accepted: false`, and the worker logged
    them all as leases lost. Their status is what they asked for: they were written."""
    issued = await make_client(db, "complete again")
    ca = str(server.data_dir / "tls" / "cert.pem")
    worker = taskgate.Worker(taskgate.Client(server.base_url, api_key=issued.api_key, verify=ca), name="w1")
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        await tg.register_kind("resend.job", payload_schema={"type": "object"})
        for _ in range(3):
            await tg.enqueue("resend.job", {})
        claim = await tg.claim(["resend.job"], worker=worker.identity, max=3, wait_s=0)
        done, failed, lost = (str(item.id) for item in claim.items)
        batch = [
            {"id": done, "attempt": 1, "outcome": "completed", "result": {"ok": True}},
            {"id": failed, "attempt": 1, "outcome": "failed", "error": "boom"},
            {"id": lost, "attempt": 1, "outcome": "completed", "result": {"ok": True}},
        ]
        first = await tg.complete(batch[:2], worker=worker.identity)  # the first send: its answer lost
        assert [a.accepted for a in first] == [True, True]
        # the third task's lease expired meanwhile and it was rescued for another attempt
        await fetch(
            clean_database,
            "UPDATE tasks SET status = 'retryable', worker_id = NULL, lease_expires_at = NULL WHERE id = $1",
            UUID(lost),
        )
        worker._client = tg
        worker._pending = list(batch)
        with caplog.at_level(logging.INFO, logger="taskgate.worker"):
            await worker._send(batch)  # sent again: the server wrote none of it this time
    messages = [r.getMessage() for r in caplog.records if r.name == "taskgate.worker"]
    written = "2 completions were already written (their tasks are 1 completed, 1 retryable, as they asked)"
    assert f"{written}: a request sent again" in messages, messages
    assert "1 completions refused: their leases were lost (their tasks are 1 retryable)" in messages, messages
    assert worker._pending == []
    rows = await fetch(clean_database, "SELECT id, status FROM tasks WHERE client_id = $1", issued.client_id)
    statuses = {str(r["id"]): r["status"] for r in rows}
    assert statuses == {done: "completed", failed: "retryable", lost: "retryable"}


async def test_an_enqueue_without_a_key_answered_503_after_its_task_was_stored_is_not_sent_again(
    db: Database, clean_database: str, tmp_path: Path
) -> None:
    """The server answers 503 when PostgreSQL is lost while it stores a task, and the commit may
    already have happened (its answer cut on the way back). `enqueue(idempotent=False)` sent the
    request again after that 503, like a 503 that surely stored nothing: two tasks for one call."""
    issued = await make_client(db, "no resend after 503")
    proxy = TcpProxy.to_database(clean_database)
    await proxy.start()
    # started in a thread: the proxy serves its connections from this loop
    server = await asyncio.to_thread(start_server, proxy.uri, tmp_path / "server")
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        ca = str(server.data_dir / "tls" / "cert.pem")
        async with taskgate.AsyncClient(
            server.base_url, api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            await tg.queues()  # the server's pool is connected, the key lookup warm
            # every INSERT into tasks takes 1 s more before it commits: long enough to cut it off
            await conn.execute(
                """CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"""
            )
            await conn.execute(
                "CREATE TRIGGER slow_insert AFTER INSERT ON tasks FOR EACH STATEMENT "
                "EXECUTE FUNCTION slow_insert()"
            )
            sent = asyncio.create_task(tg.enqueue("noop", {}, idempotent=False))

            async def sleeping() -> bool:
                return bool(
                    await conn.fetchval(  # this database's: other tests' sleep in theirs
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event = 'PgSleep' AND datname = current_database()"
                    )
                )

            await eventually(sleeping, timeout=20, interval=0.02)
            proxy.freeze()  # the commit's answer is held on its way back to the server
            await eventually(lambda: tasks_of(clean_database, issued.client_id), timeout=5, interval=0.02)
            proxy.refuse()  # then every connection is cut: the server answers 503
            proxy.resume()
            await proxy.start()  # and PostgreSQL is back at once
            await conn.execute("DROP TRIGGER slow_insert ON tasks")
            [answer] = await asyncio.gather(asyncio.wait_for(sent, 30), return_exceptions=True)
        assert len(await tasks_of(clean_database, issued.client_id)) == 1  # never two
        assert isinstance(answer, taskgate.ApiError), answer  # the 503, for the caller to decide
        assert answer.status == 503
    finally:
        await asyncio.to_thread(server.stop)
        await conn.execute("DROP TRIGGER IF EXISTS slow_insert ON tasks")
        await conn.execute("DROP FUNCTION IF EXISTS slow_insert()")
        await conn.close()
        await proxy.close()


@contextlib.asynccontextmanager
async def behind_a_database_proxy(
    clean_database: str, data_dir: Path
) -> AsyncIterator[tuple[ServerProcess, TcpProxy, asyncpg.Connection]]:
    """The server with its PostgreSQL behind a proxy the test cuts, and a connection of the test's own."""
    proxy = TcpProxy.to_database(clean_database)
    await proxy.start()
    # started in a thread: the proxy serves its connections from this loop
    server = await asyncio.to_thread(start_server, proxy.uri, data_dir)
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        yield server, proxy, conn
    finally:
        await asyncio.to_thread(server.stop)
        await conn.close()
        await proxy.close()


async def answered_503_after_its_commit(
    conn: asyncpg.Connection,
    proxy: TcpProxy,
    *,
    table: str,
    event: str,
    send: Any,
    stored: Any,
) -> Any:
    """What the SDK call `send` returns (or raises) when the server's PostgreSQL is cut off right
    after the call's transaction committed (a deferred trigger makes its COMMIT take 1 s; the
    proxy holds the answer and then cuts every connection): the server answers 503."""
    await conn.execute(
        """CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"""
    )
    await conn.execute(
        f"CREATE CONSTRAINT TRIGGER slow_commit AFTER {event} ON {table} "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    )
    try:
        sent = asyncio.create_task(send)

        async def sleeping() -> bool:
            return bool(
                await conn.fetchval(  # this database's: other tests' sleep in theirs
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event = 'PgSleep' AND datname = current_database()"
                )
            )

        await eventually(sleeping, timeout=20, interval=0.02)
        proxy.freeze()  # the commit's answer is held on its way back to the server
        await eventually(stored, timeout=5, interval=0.02)
        proxy.refuse()  # then every connection is cut: the server answers 503
        proxy.resume()
        await proxy.start()  # and PostgreSQL is back at once
        await conn.execute(f"DROP TRIGGER slow_commit ON {table}")
        [answer] = await asyncio.gather(asyncio.wait_for(sent, 30), return_exceptions=True)
        return answer
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS slow_commit ON {table}")


async def test_a_signal_and_a_schedule_answered_503_after_their_commit_succeed_once(
    db: Database, clean_database: str, tmp_path: Path
) -> None:
    """Sent again after that 503, a signal was refused 409 "already received" and a schedule 409
    "already exists": `signal` and `create_schedule` raised for calls that had succeeded. The
    server now answers the same signal (task, name, data) and the same schedule (name and
    definition) as it did the first time: each call returns, and each was stored once."""
    issued = await make_client(db, "signal after 503")
    async with behind_a_database_proxy(clean_database, tmp_path / "server") as (server, proxy, conn):
        ca = str(server.data_dir / "tls" / "cert.pem")
        async with taskgate.AsyncClient(
            server.base_url, api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            task = await tg.enqueue("noop", {}, delay_s=3600)

            async def signal_kept() -> bool:
                return bool(
                    await conn.fetchval("SELECT count(*) FROM task_signals WHERE task_id = $1", task.id)
                )

            answer = await answered_503_after_its_commit(
                conn, proxy, table="task_signals", event="INSERT",
                send=tg.signal(task.id, "go", {"n": 1}), stored=signal_kept,
            )  # fmt: skip
            assert isinstance(answer, dict), answer
            assert answer["name"] == "go"
            assert await conn.fetchval("SELECT count(*) FROM task_signals") == 1

            async def schedule_kept() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM schedules"))

            made = await answered_503_after_its_commit(
                conn, proxy, table="schedules", event="INSERT",
                send=tg.create_schedule("nightly", "0 2 * * *", {"kind": "noop"}), stored=schedule_kept,
            )  # fmt: skip
            assert isinstance(made, taskgate.Schedule), made
            rows = await conn.fetch("SELECT id FROM schedules")
            assert [r["id"] for r in rows] == [made.id]


async def test_a_cancel_answered_503_after_its_commit_returns_the_cancelled_task(
    db: Database, clean_database: str, tmp_path: Path
) -> None:
    """Sent again after that 503, the cancel was refused 409 ("cancelled and can no longer be
    cancelled"): `cancel` raised for the task it had cancelled."""
    issued = await make_client(db, "cancel after 503")
    async with behind_a_database_proxy(clean_database, tmp_path / "server") as (server, proxy, conn):
        ca = str(server.data_dir / "tls" / "cert.pem")
        async with taskgate.AsyncClient(
            server.base_url, api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            task = await tg.enqueue("noop", {}, delay_s=3600)

            async def cancelled() -> bool:
                return await conn.fetchval("SELECT status FROM tasks WHERE id = $1", task.id) == "cancelled"

            answer = await answered_503_after_its_commit(
                conn, proxy, table="tasks", event="UPDATE", send=tg.cancel(task.id), stored=cancelled
            )
            assert isinstance(answer, taskgate.Task), answer
            assert (answer.id, answer.status) == (task.id, "cancelled")


async def test_a_trigger_or_a_retry_answered_503_after_its_commit_is_not_sent_again(
    db: Database, clean_database: str, tmp_path: Path
) -> None:
    """Sent again after that 503, a schedule's trigger made a second task (two fires for one call),
    and a retry by hand was refused 409 for the task it had retried (or, had the task failed again
    meanwhile, retried it a second time). Neither is sent again after a 503: the caller gets it."""
    issued = await make_client(db, "trigger after 503")
    async with behind_a_database_proxy(clean_database, tmp_path / "server") as (server, proxy, conn):
        ca = str(server.data_dir / "tls" / "cert.pem")
        async with taskgate.AsyncClient(
            server.base_url, api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            schedule = await tg.create_schedule("nightly", "0 2 * * *", {"kind": "noop"}, paused=True)

            async def fired() -> bool:
                return bool(await tasks_of(clean_database, issued.client_id))

            answer = await answered_503_after_its_commit(
                conn,
                proxy,
                table="tasks",
                event="INSERT",
                send=tg.trigger_schedule(schedule.id),
                stored=fired,
            )
            assert len(await tasks_of(clean_database, issued.client_id)) == 1  # never two
            assert isinstance(answer, taskgate.ApiError), answer
            assert answer.status == 503

            [task_id] = await tasks_of(clean_database, issued.client_id)
            await tg.cancel(task_id)

            async def retried() -> bool:
                return (
                    await conn.fetchval("SELECT status FROM tasks WHERE id = $1", UUID(task_id))
                    != "cancelled"
                )

            answer = await answered_503_after_its_commit(
                conn, proxy, table="tasks", event="UPDATE", send=tg.retry(task_id), stored=retried
            )
            assert isinstance(answer, taskgate.ApiError), answer
            assert answer.status == 503


async def test_a_delete_answered_503_after_its_commit_succeeds(
    db: Database, clean_database: str, tmp_path: Path
) -> None:
    """Sent again after that 503, the delete of a schedule and of a remote kind was answered 404:
    `delete_schedule` and `delete_kind` raised "not found" for deletes that had worked."""
    issued = await make_client(db, "delete after 503")
    async with behind_a_database_proxy(clean_database, tmp_path / "server") as (server, proxy, conn):
        ca = str(server.data_dir / "tls" / "cert.pem")
        async with taskgate.AsyncClient(
            server.base_url, api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            schedule = await tg.create_schedule("nightly", "0 2 * * *", {"kind": "noop"})

            async def schedule_gone() -> bool:
                return not await conn.fetchval("SELECT count(*) FROM schedules")

            answer = await answered_503_after_its_commit(
                conn, proxy, table="schedules", event="DELETE",
                send=tg.delete_schedule(schedule.id), stored=schedule_gone,
            )  # fmt: skip
            assert isinstance(answer, taskgate.Schedule), answer
            assert answer == schedule  # the schedule as it was when deleted
            assert await tg.schedules() == []

            await tg.register_kind("resend.kind", payload_schema={"type": "object"})

            async def kind_gone() -> bool:
                return not await conn.fetchval("SELECT count(*) FROM remote_kinds")

            answer = await answered_503_after_its_commit(
                conn, proxy, table="remote_kinds", event="DELETE",
                send=tg.delete_kind("resend.kind"), stored=kind_gone,
            )  # fmt: skip
            assert answer is None, answer
            assert "resend.kind" not in [k.name for k in await tg.kinds()]


async def a_write_waits(conn: asyncpg.Connection, table: str) -> None:
    async def waiting() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass", table
            )
        )

    await eventually(waiting, timeout=20, interval=0.02)


async def test_setting_calls_whose_connection_dropped_are_sent_again(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """`register_kind`, `put_queue`, `pause_queue` and `update_schedule` set what they name to
    what they carry, so sending them again changes nothing more: a connection cut while the server
    worked on one (a proxy or load balancer going away) ended the call with a ReadError /
    RemoteProtocolError, and a Worker whose kind registration it was did not start."""
    issued = await make_client(db, "set again")
    port = urlsplit(server.base_url).port
    assert port is not None
    proxy = TcpProxy(port=port)
    await proxy.start()
    ca = str(server.data_dir / "tls" / "cert.pem")
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with taskgate.AsyncClient(
            f"https://localhost:{proxy.port}", api_key=issued.api_key, verify=ca, timeout_s=10
        ) as tg:
            await tg.put_queue("reports")
            nightly = await tg.create_schedule("nightly", "0 2 * * *", {"kind": "noop"})
            for table, send in (
                ("remote_kinds", lambda: tg.register_kind("resend.set", payload_schema={"type": "object"})),
                ("queues", lambda: tg.pause_queue("reports")),
                ("queues", lambda: tg.put_queue("reports", max_concurrency=3)),
                ("schedules", lambda: tg.update_schedule(nightly.id, cron="0 3 * * *")),
            ):
                async with conn.transaction():  # its write waits: it reached the server
                    await conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
                    sent = asyncio.create_task(send())
                    await a_write_waits(conn, table)
                    proxy.refuse()  # every connection through it cut; then it listens again
                    await proxy.start()
                    await asyncio.sleep(0.5)
                    assert not sent.done(), sent.exception()
                await asyncio.wait_for(sent, 30)
            assert "resend.set" in [k.name for k in await tg.kinds()]
            queue = await tg.get_queue("reports")
            assert (queue.paused, queue.max_concurrency) == (True, 3)
            assert (await tg.get_schedule(nightly.id)).cron == "0 3 * * *"
    finally:
        await conn.close()
        await proxy.close()
