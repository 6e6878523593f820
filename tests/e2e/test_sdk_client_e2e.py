"""The SDK client against the real server over HTTPS: what it sends is what the server takes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import BaseModel

from app.database import Database
from app.src.database.tasks import EVENTS_CHANNEL
from tests.conftest import ROOT, make_client
from tests.e2e.conftest import ServerProcess
from tests.proxy import TcpProxy
from tests.task_harness import fetch

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

pytestmark = pytest.mark.timeout(90)


def sdk_client(server: ServerProcess, key: str) -> taskgate.Client:
    return taskgate.Client(server.base_url, api_key=key, verify=str(server.data_dir / "tls" / "cert.pem"))


async def test_enqueue_many_takes_the_task_ids_and_uuids_enqueue_takes(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """`enqueue(..., depends_on=[task.id])` worked, but the same in an `enqueue_many` item (or a
    UUID anywhere in a payload) raised TypeError: Object of type UUID is not JSON serializable."""
    issued = await make_client(db, "uuids")
    with sdk_client(server, issued.api_key) as tg:
        first = await asyncio.to_thread(tg.enqueue, "noop", {})
        items = [{"kind": "noop", "payload": {"after": first.id}, "depends_on": [first.id]}]
        [second] = await asyncio.to_thread(tg.enqueue_many, items)
    assert second.payload == {"after": str(first.id)}
    rows = await fetch(clean_database, "SELECT depends_on FROM tasks WHERE id = $1", second.id)
    assert [str(d) for d in rows[0]["depends_on"]] == [str(first.id)]


async def test_events_follow_a_task_through_any_number_of_dropped_streams(
    server: ServerProcess, db: Database, clean_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events()` counted every reconnect of its life against one budget (20): a task followed
    across that many dropped streams (deploys, a proxy's connection age limit) ended the iteration
    with a transport error although every stream had served, or, when they ended cleanly,
    silently, before the task was terminal."""
    monkeypatch.setattr(taskgate.client, "MAX_EVENT_RECONNECTS", 2)
    issued = await make_client(db, "events")
    port = urlsplit(server.base_url).port
    assert port is not None
    proxy = TcpProxy(port=port)
    await proxy.start()
    ca = str(server.data_dir / "tls" / "cert.pem")
    statuses: list[str] = []
    try:
        async with (
            taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as direct,
            taskgate.AsyncClient(f"https://localhost:{proxy.port}", api_key=issued.api_key, verify=ca) as tg,
        ):
            task = await direct.enqueue("noop", {}, run_at=None, delay_s=3600)  # scheduled: not terminal
            async for event in tg.events(task.id):
                statuses.append(event.status)
                if event.terminal:
                    break
                if len(statuses) <= 4:  # more dropped streams than the budget, each after an event
                    proxy.refuse()
                    await proxy.start()
                    await _report_progress(clean_database, task.id, len(statuses))  # a change to resume to
                else:
                    await direct.cancel(task.id)
    finally:
        await proxy.close()
    assert statuses == ["scheduled"] * 5 + ["cancelled"]


async def _report_progress(database_uri: str, task_id: object, progress: object) -> None:
    """What a worker's progress report does: the task's progress set, its followers woken."""
    await fetch(
        database_uri,
        f"WITH changed AS (UPDATE tasks SET progress = $2 WHERE id = $1 RETURNING id) "
        f"SELECT pg_notify('{EVENTS_CHANNEL}', id::text) FROM changed",
        task_id,
        json.dumps(progress),
    )


async def test_events_resume_after_a_dropped_stream_with_every_event_once(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A stream opened again started over with the task's current state (so `events()` yielded
    an unchanged state twice) and sent no SSE id to resume from. Now every message has an id,
    `events()` sends the last one as Last-Event-ID, and the server sends only what followed it."""
    issued = await make_client(db, "events resume")
    port = urlsplit(server.base_url).port
    assert port is not None
    proxy = TcpProxy(port=port)
    await proxy.start()
    ca = str(server.data_dir / "tls" / "cert.pem")
    seen: list[tuple[str, object]] = []
    arrived = asyncio.Event()

    async def follow(tg: taskgate.AsyncClient, task_id: object) -> None:
        async for event in tg.events(task_id):  # type: ignore[arg-type]
            seen.append((event.status, event.progress))
            arrived.set()

    async def until(condition: Callable[[], bool], within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return condition()

    try:
        async with (
            taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as direct,
            taskgate.AsyncClient(f"https://localhost:{proxy.port}", api_key=issued.api_key, verify=ca) as tg,
        ):
            task = await direct.enqueue("noop", {}, run_at=None, delay_s=3600)  # scheduled: not terminal
            following = asyncio.create_task(follow(tg, task.id))
            for progress in (1, 2, 3):
                assert await until(lambda n=progress: len(seen) == n, 10)
                connections = proxy.accepted
                proxy.refuse()  # the connection cut under the stream, the state unchanged
                await proxy.start()
                assert await until(lambda c=connections: proxy.accepted > c, 10)  # reconnected
                # a stream that started over would send the unchanged state again by now
                assert not await until(lambda n=progress: len(seen) > n, 0.5), seen
                await _report_progress(clean_database, task.id, progress)
            assert await until(lambda: len(seen) == 4, 10)
            await direct.cancel(task.id)
            await asyncio.wait_for(following, 10)
    finally:
        await proxy.close()
    changes = [("scheduled", None), ("scheduled", 1), ("scheduled", 2), ("scheduled", 3)]
    assert seen == [*changes, ("cancelled", 3)]


async def test_a_resumed_stream_sends_each_composition_event_once(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """Composition events (`event: step` ...) across a reconnect: none the client had is sent
    again, none stored after the id it sends back is missed, and the unchanged state is not
    sent again."""
    issued = await make_client(db, "events resume steps")
    ca = str(server.data_dir / "tls" / "cert.pem")
    headers = {"Authorization": f"Bearer {issued.api_key}", "Accept": "text/event-stream"}
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as direct:
        task = await direct.enqueue("noop", {}, run_at=None, delay_s=3600)

    async def store_step(name: str) -> None:
        await fetch(
            clean_database,
            "WITH s AS (INSERT INTO task_steps (task_id, name, result) VALUES ($1, $2, 'null') "
            "RETURNING task_id), "
            "t AS (UPDATE tasks SET durable = true WHERE id = $1 RETURNING id) "
            f"SELECT pg_notify('{EVENTS_CHANNEL}', $1::text) FROM s, t",
            task.id,
            name,
        )

    async def read(http: httpx.AsyncClient, until: int, last_id: str | None) -> list[tuple[str, str, str]]:
        """(event, name or status, id) of the first `until` messages of a stream, then it is dropped."""
        got: list[tuple[str, str, str]] = []
        extra = {"Last-Event-ID": last_id} if last_id else {}
        async with http.stream("GET", f"/api/tasks/{task.id}/events", headers={**headers, **extra}) as r:
            assert r.status_code == 200
            event, data, sse_id = "", "", ""
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    sse_id = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and event:
                    body = json.loads(data)
                    got.append((event, body.get("name") or body.get("status"), sse_id))
                    event = ""
                    if len(got) == until:
                        break
        return got

    await store_step("a")
    await store_step("b")
    tls = ssl.create_default_context(cafile=ca)
    async with httpx.AsyncClient(base_url=server.base_url, verify=tls, timeout=10) as http:
        first = await read(http, 2, None)  # step a, step b (the state not yet): dropped here
        assert [(e, n) for e, n, _ in first] == [("step", "a"), ("step", "b")]
        assert all(i for _, _, i in first)
        await store_step("c")  # stored while no stream was open
        second = await read(http, 2, first[-1][2])
        assert [(e, n) for e, n, _ in second] == [("step", "c"), ("task", "scheduled")]
        await store_step("d")
        third = await read(http, 1, second[-1][2])
        assert [(e, n) for e, n, _ in third] == [("step", "d")]  # the unchanged state not again
        again = await read(http, 1, first[0][2])  # an older id: what followed it, each once
        assert [(e, n) for e, n, _ in again] == [("step", "b")]


class Note(BaseModel):
    text: str | None  # required, and may be null


async def test_a_payload_model_keeps_its_null_fields(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A pydantic payload was dumped with exclude_none: a required field set to None was left
    out, and the server refused the enqueue (422: the kind's schema, made from the same model,
    requires it)."""
    issued = await make_client(db, "nulls")
    with sdk_client(server, issued.api_key) as tg:
        await asyncio.to_thread(tg.register_kind, "notes.keep", payload_schema=Note.model_json_schema())
        task = await asyncio.to_thread(tg.enqueue, "notes.keep", Note(text=None))
    assert task.payload == {"text": None}


async def test_workers_reads_every_page(server: ServerProcess, db: Database, clean_database: str) -> None:
    """`GET /api/workers` comes in pages (it stopped at the 1,000 seen last): `workers()` follows
    them, sync and async, to every worker seen lately."""
    issued = await make_client(db, "many workers")
    await fetch(
        clean_database,
        "INSERT INTO workers (id, client_id, name, remote) "
        "SELECT gen_random_uuid(), $1, 'w' || g, true FROM generate_series(1, 1203) g",
        issued.client_id,
    )
    ca = str(server.data_dir / "tls" / "cert.pem")
    with sdk_client(server, issued.api_key) as tg:
        remote = [w.name for w in await asyncio.to_thread(tg.workers) if w.remote]
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as atg:
        remote_async = [w.name for w in await atg.workers() if w.remote]
    assert len(remote) == len(set(remote)) == 1203
    assert sorted(remote_async) == sorted(remote)


async def test_events_wait_as_long_as_a_stopping_server_asks_before_reconnecting(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A server that shuts down ends each event stream with `event: shutdown` and the SSE `retry`
    field (1,000 ms: another replica answers then); `events()` ignored both and reconnected
    after 0.2 s, to the replica that was going away."""
    issued = await make_client(db, "events hint")
    port = urlsplit(server.base_url).port
    assert port is not None
    proxy = TcpProxy(port=port)
    opened: list[float] = []  # when each connection of the SDK's reached the proxy
    forward = proxy._accept

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(time.monotonic())
        await forward(reader, writer)

    proxy._accept = counted  # type: ignore[method-assign]
    await proxy.start()
    ca = str(server.data_dir / "tls" / "cert.pem")
    try:
        async with (
            taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as direct,
            taskgate.AsyncClient(f"https://localhost:{proxy.port}", api_key=issued.api_key, verify=ca) as tg,
        ):
            task = await direct.enqueue("noop", {}, delay_s=3600)  # scheduled: not terminal
            first = asyncio.Event()

            async def follow() -> None:
                async for _ in tg.events(task.id):
                    first.set()

            following = asyncio.create_task(follow())
            await asyncio.wait_for(first.wait(), 10)
            streams = len(opened)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            for _ in range(100):  # the stream ends at once; then the SDK opens another
                if len(opened) > streams:
                    break
                await asyncio.sleep(0.05)
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await following
    finally:
        await proxy.close()
    assert len(opened) > streams
    assert opened[streams] - signalled >= 0.9  # the server's 1 s, not 0.2 s
