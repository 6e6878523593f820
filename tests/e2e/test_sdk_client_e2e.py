"""The SDK client against the real server over HTTPS: what it sends is what the server takes."""

from __future__ import annotations

import asyncio
import sys

import pytest

from app.database import Database
from tests.conftest import ROOT, make_client
from tests.e2e.conftest import ServerProcess
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
