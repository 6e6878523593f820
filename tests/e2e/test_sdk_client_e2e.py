"""The SDK client against the real server over HTTPS: what it sends is what the server takes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import BaseModel

from app.database import Database
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
                else:
                    await direct.cancel(task.id)
    finally:
        await proxy.close()
    assert statuses == ["scheduled"] * 5 + ["cancelled"]


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
