"""The engine's core cases with the service behind PgBouncer (each in transaction mode with and
without a LISTEN connection, and in session mode): enqueue, idempotency (a transaction-scoped
advisory lock), long-poll, retries, claims across two worker processes, and the elections of
maintenance jobs and schedule fires between two schedulers.

Most cases are the integration suite's own tests, imported so they run here against the
overridden fixtures of tests/pgbouncer/conftest.py; the worker processes and the long-poll's
promptness without LISTEN are checked by the tests below.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.test_scheduler import (
    test_a_run_longer_than_its_period_is_never_doubled_by_another_replica,
    test_racing_firers_make_one_task_per_fire_time,
)
from tests.integration.test_tasks_api import (
    test_a_key_in_flight_gets_409,
    test_batch_is_all_or_nothing,
    test_eight_parallel_requests_with_one_key_create_one_task,
    test_enqueue_returns_the_task_in_spec_shape,
    test_idempotency_key_replays_the_original,
    test_wait_returns_at_the_timeout_for_an_unfinished_task,
)
from tests.integration.test_worker import (
    test_a_task_runs_and_wait_returns_the_result,
    test_retries_follow_backoff_and_end_in_discarded,
)
from tests.integration.test_worker_processes import batch, count
from tests.pgbouncer.bouncer import PgBouncer
from tests.task_harness import enqueue, eventually, read_records, spawn_worker, started

pytestmark = pytest.mark.pgbouncer

__all__ = [
    "test_a_key_in_flight_gets_409",
    "test_a_run_longer_than_its_period_is_never_doubled_by_another_replica",
    "test_a_task_runs_and_wait_returns_the_result",
    "test_batch_is_all_or_nothing",
    "test_eight_parallel_requests_with_one_key_create_one_task",
    "test_enqueue_returns_the_task_in_spec_shape",
    "test_idempotency_key_replays_the_original",
    "test_racing_firers_make_one_task_per_fire_time",
    "test_retries_follow_backoff_and_end_in_discarded",
    "test_wait_returns_at_the_timeout_for_an_unfinished_task",
]


async def test_two_worker_processes_behind_pgbouncer_run_each_task_once(
    serving: Any, auth_headers: dict[str, str], clean_database: str, pooling: dict[str, Any], tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    marks = tmp_path / "runs.txt"
    service_env = {k: v for k, v in pooling.items() if k != "mode"}
    workers = [
        spawn_worker(clean_database, tmp_path / f"w{i}", WORKER_CONCURRENCY="10", **service_env)
        for i in range(2)
    ]
    try:
        await started(*workers)
        # Without LISTEN a worker wakes only on its 1 s poll: each task takes 0.1 s so that one
        # worker alone would need 3 s, and the other worker's poll finds work before the end.
        tasks = [{"kind": "test.record", "payload": {"path": str(marks), "seconds": 0.1}}] * 300
        await batch(client, auth_headers, tasks)
        await eventually(lambda: _all_done(clean_database), timeout=60)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        exit_codes = [worker.wait(timeout=30) for worker in workers]
    logs = "".join(w.log_path.read_text() for w in workers)  # type: ignore[attr-defined]
    assert exit_codes == [0, 0], logs
    assert "prepared statement" not in logs  # the failure PgBouncer's transaction mode provokes
    runs = read_records(marks)
    per_task = Counter(task_id for task_id, *_ in runs)
    assert len(per_task) == 300
    assert set(per_task.values()) == {1}
    assert len({pid for _, _, pid, _, _ in runs}) == 2  # both processes took part


async def _all_done(database_uri: str) -> bool:
    return await count(database_uri, "status <> 'completed'") == 0


async def test_a_long_poll_answers_soon_after_the_task_finishes(
    serving: Any, auth_headers: dict[str, str], pooling: dict[str, Any]
) -> None:
    """Woken by NOTIFY where a LISTEN connection exists, by its polling re-reads where none can."""
    app = await serving(ROLES=["api", "worker"])
    client = app.test_client()
    runtime = app.extensions["taskgate"]
    assert runtime.notifier.listening is (pooling["mode"] != "transaction")
    task = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 0.2})
    began = time.monotonic()
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    waited = time.monotonic() - began
    assert done["status"] == "completed"
    assert waited < 4.0  # within the 5 s safety re-read: the wait was woken or polled, not timed out


async def test_the_statement_cache_it_turns_off_is_what_transaction_pooling_breaks(
    bouncers: dict[str, Any],
) -> None:
    """The control: asyncpg's default statement cache through transaction pooling fails (a named
    statement prepared on one server connection is executed on another); without it, none do."""
    pool: PgBouncer = bouncers["transaction"]
    dsn = pool.uri().replace("postgresql+asyncpg://", "postgresql://")

    async def errors(**options: Any) -> int:
        connections = await asyncpg.create_pool(dsn, min_size=10, max_size=10, **options)
        failed = 0

        async def queries(i: int) -> None:
            nonlocal failed
            async with connections.acquire() as conn:
                for j in range(30):
                    try:
                        await conn.fetchval(f"SELECT $1::int + {i % 7}", j)
                    except asyncpg.InvalidSQLStatementNameError:
                        failed += 1

        try:
            await asyncio.gather(*(queries(i) for i in range(10)))
        finally:
            await connections.close()
        return failed

    assert await errors() > 0
    assert await errors(statement_cache_size=0) == 0


async def test_a_cancel_reaches_a_running_handler_within_a_poll_without_listen(
    serving: Any, auth_headers: dict[str, str], pooling: dict[str, Any]
) -> None:
    """A cancel asked for a running task reaches its handler by NOTIFY; where no LISTEN connection
    exists it reached it only with the worker's next heartbeat, a third of the lease (10 s with
    the default 30 s lease), while every other wait polls."""
    app = await serving(ROLES=["api", "worker"], LEASE_SECONDS=30)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 30})

    async def running() -> bool:
        current = await (await client.get(f"/api/tasks/{task['id']}", headers=auth_headers)).get_json()
        return bool(current["status"] == "running")

    await eventually(running, timeout=10)
    began = time.monotonic()
    accepted = await (await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)).get_json()
    assert accepted["status"] == "running"  # asked, not forced
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=6", headers=auth_headers)).get_json()
    assert done["status"] == "cancelled", done
    assert done["last_error"].startswith("cancelled after")
    assert time.monotonic() - began < 3.0
