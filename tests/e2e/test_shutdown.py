"""SIGTERM with clients following tasks: one grace period, nothing claimed after it, no cut answers."""

import asyncio
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from tests.e2e.conftest import start_server, wait_ready
from tests.e2e.test_edge_limits import silent_tls_socket
from tests.task_harness import eventually, fetch

GRACE_S = 2.0


async def test_sigterm_ends_long_polls_and_streams_then_exits_within_the_grace(
    clean_database: str, tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    server = start_server(
        clean_database,
        tmp_path / "server",
        roles="api,worker",
        env={"WORKER_SHUTDOWN_GRACE_S": GRACE_S, "WORKER_CONCURRENCY": 2, "WORKER_POLL_INTERVAL_S": 0.2},
    )
    try:
        connector = aiohttp.TCPConnector(ssl=server.ssl_context())
        async with aiohttp.ClientSession(
            base_url=server.base_url, connector=connector, headers=auth_headers
        ) as https:
            await wait_ready(https)

            async def enqueue(task: dict[str, object]) -> str:
                async with https.post("/api/tasks", json=task) as response:
                    assert response.status == 201, await response.text()
                    return str((await response.json())["id"])

            followed = await enqueue({"kind": "noop", "payload": {}, "delay_s": 600})
            stuck = await enqueue({"kind": "sleep", "payload": {"seconds": 60}, "priority": 0})
            async with https.post(
                "/api/tasks/batch", json={"tasks": [{"kind": "sleep", "payload": {"seconds": 0.2}}] * 200}
            ) as response:
                assert response.status == 201
            # the worker is busy: the long task holds a slot, short ones keep the other one claiming
            await eventually(lambda: _status_is(clean_database, stuck, "running"), timeout=30)

            async with https.put(
                "/api/catalog/kinds/reports.idle", json={"payload_schema": {"type": "object"}}
            ) as response:
                assert response.status == 201, await response.text()
            long_poll = asyncio.create_task(_long_poll(https, followed))
            remote_claim = asyncio.create_task(_remote_claim(https))
            events = await https.get(f"/api/tasks/{followed}/events")
            assert events.status == 200
            first = await events.content.readuntil(b"\n\n")
            assert first.startswith(b"event: task")
            # and clients that must not delay the stop: heads and a body that never end, from
            # peers that never read (so they cannot answer the server's TLS close_notify either)
            slow = [silent_tls_socket(server) for _ in range(3)]
            for sock in slow[:2]:
                sock.sendall(b"GET /api/common/health HTTP/1.1\r\nHost: localhost\r\n")
            slow[2].sendall(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            slow[2].sendall(b"Content-Length: 1000\r\n\r\n{")
            await asyncio.sleep(0.3)  # the long-poll is waiting
            assert not long_poll.done()
            assert not remote_claim.done()

            signalled_at = datetime.now(UTC)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            status, retry_after, connection, body = await asyncio.wait_for(long_poll, timeout=2)
            assert (status, retry_after, body["status"]) == (200, "1", "scheduled")
            # not to be reused: the server closes its connections as it drains, and a next request
            # sent on this one would be cut (the client opens a new one, refused or elsewhere)
            assert connection == "close"
            # a remote worker's claim long-poll ends too, with nothing claimed: claim elsewhere
            status, retry_after, claimed = await asyncio.wait_for(remote_claim, timeout=2)
            assert (status, retry_after, claimed["items"]) == (200, "1", [])
            rest = await asyncio.wait_for(events.content.read(), timeout=2)  # raises if cut mid-chunk
            assert rest.endswith(b'event: shutdown\ndata: {"retry_after_s": 1}\n\n'), rest
            events.release()
            code = await asyncio.to_thread(server.process.wait, 10)
            elapsed = time.monotonic() - signalled
            # the request whose body never came was told so (no 500)
            assert slow[2].recv(65536).startswith(b"HTTP/1.1 503 ")
            for sock in slow:
                sock.close()
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, server.log()
    assert elapsed < GRACE_S + 1, elapsed
    log = server.log()
    assert "Traceback" not in log
    assert '"status": 500' not in log
    claimed_after = await fetch(
        clean_database, "SELECT count(*) AS n FROM tasks WHERE started_at > $1", signalled_at
    )
    assert claimed_after[0]["n"] == 0
    [row] = await fetch(clean_database, "SELECT status, attempts, worker_id FROM tasks WHERE id = $1", stuck)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("available", 0, None)  # released
    unclaimed = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE status = 'available'")
    assert unclaimed[0]["n"] > 100  # the short tasks the worker did not get to stay for another one


async def _long_poll(
    https: aiohttp.ClientSession, task_id: str
) -> tuple[int, str | None, str | None, dict[str, str]]:
    async with https.get(f"/api/tasks/{task_id}", params={"wait": "60"}) as response:
        headers = response.headers
        return response.status, headers.get("Retry-After"), headers.get("Connection"), await response.json()


async def _remote_claim(https: aiohttp.ClientSession) -> tuple[int, str | None, dict[str, list[object]]]:
    body = {"worker": {"name": "w1"}, "kinds": ["reports.idle"], "max": 10, "wait_s": 30}
    async with https.post("/api/workers/claim", json=body) as response:
        return response.status, response.headers.get("Retry-After"), await response.json()


async def _status_is(database_uri: str, task_id: str, status: str) -> bool:
    rows = await fetch(database_uri, "SELECT status FROM tasks WHERE id = $1", task_id)
    return bool(rows) and rows[0]["status"] == status


async def test_a_second_sigint_during_the_drain_still_hands_back_running_tasks(
    clean_database: str, tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    # uvicorn's forced exit (Ctrl-C twice) skipped the application's stop: the running task stayed
    # claimed, its attempt spent, until its lease expired
    server = start_server(
        clean_database,
        tmp_path / "server",
        roles="api,worker",
        env={"WORKER_SHUTDOWN_GRACE_S": 10, "WORKER_CONCURRENCY": 2, "WORKER_POLL_INTERVAL_S": 0.2},
    )
    try:
        connector = aiohttp.TCPConnector(ssl=server.ssl_context())
        async with aiohttp.ClientSession(
            base_url=server.base_url, connector=connector, headers=auth_headers
        ) as https:
            await wait_ready(https)
            task = {"kind": "sleep", "payload": {"seconds": 60}}
            async with https.post("/api/tasks", json=task) as response:
                assert response.status == 201, await response.text()
                running = str((await response.json())["id"])
            await eventually(lambda: _status_is(clean_database, running, "running"), timeout=30)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        await asyncio.sleep(0.05)
        server.process.send_signal(signal.SIGINT)  # Ctrl-C again, while the server drains
        code = await asyncio.to_thread(server.process.wait, 20)
        elapsed = time.monotonic() - signalled
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, server.log()
    assert elapsed < 5, elapsed  # forced: the grace (10 s) is not waited for
    assert "Traceback" not in server.log()
    query = "SELECT status, attempts, worker_id FROM tasks WHERE id = $1"
    [row] = await fetch(clean_database, query, running)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("available", 0, None)  # handed back
