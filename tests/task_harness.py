"""What tests that drive tasks share: enqueue over the API, wait for states, spawn workers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
from quart.typing import TestClientProtocol as Client

from tests.conftest import ROOT, driver_uri, subprocess_env


async def enqueue(client: Client, headers: dict[str, str], **task: Any) -> dict[str, Any]:
    response = await client.post("/api/tasks", json=task, headers=headers)
    assert response.status_code == 201, await response.get_data(as_text=True)
    body: dict[str, Any] = await response.get_json()
    return body


async def eventually(check: Callable[[], Any], *, timeout: float = 20, interval: float = 0.05) -> Any:
    """Await check() until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)


async def fetch(database_uri: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(driver_uri(database_uri))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def claims_fail_in(database_uri: str, queue: str) -> AsyncIterator[None]:
    """While open, every statement that starts a task of `queue` fails (a trigger raises): a claim
    statement of that queue that fails whatever its rows, as a fault in PostgreSQL would."""
    await fetch(
        database_uri,
        f"""CREATE FUNCTION fail_claims() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected: claims of queue {queue} fail'; END $$""",
    )
    await fetch(
        database_uri,
        "CREATE TRIGGER fail_claims BEFORE UPDATE ON tasks FOR EACH ROW "
        f"WHEN (NEW.queue = '{queue}' AND NEW.status = 'running' AND OLD.status = 'available') "
        "EXECUTE FUNCTION fail_claims()",
    )
    try:
        yield
    finally:
        await fetch(database_uri, "DROP TRIGGER fail_claims ON tasks")
        await fetch(database_uri, "DROP FUNCTION fail_claims()")


def spawn_worker(database_uri: str, data_dir: Path, **env: Any) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"worker-{time.monotonic_ns()}.log"
    log = log_path.open("wb")
    settings = {
        "APP_ENV": "test",
        "DB_URI": database_uri,
        "DATA_DIR": data_dir,
        "LOG_FORMAT": "console",
        "TASK_KIND_MODULES": "tests.kinds",
        "WORKER_POLL_INTERVAL_S": "0.2",
        "SECRET_KEYS": "unused-by-workers",
    }
    settings.update(env)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"],
            cwd=ROOT,
            env=subprocess_env(**settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


async def started(*workers: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until every worker process logged that it claims work."""

    def ready() -> bool:
        for worker in workers:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited early:\n{worker.log_path.read_text()}")  # type: ignore[attr-defined]
        return all("worker started" in w.log_path.read_text() for w in workers)  # type: ignore[attr-defined]

    await eventually(ready, timeout=timeout)


def read_records(path: Path) -> list[tuple[str, int, int, float, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        task_id, attempt, pid, start, end = line.split()
        rows.append((task_id, int(attempt), int(pid), float(start), float(end)))
    return rows


def lines(path: Path) -> list[str]:
    """The lines a test kind appended to `path` so far (none before it first wrote)."""
    return path.read_text().splitlines() if path.exists() else []
