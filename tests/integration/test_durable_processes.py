"""Durable composition with real worker processes: fan-out across two, then a SIGKILL between steps."""

import json
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from quart import Quart

from tests.task_harness import enqueue, eventually, fetch, lines, spawn_worker, started

Serving = Callable[..., Awaitable[Quart]]


async def _finished(database_uri: str, task_id: str) -> dict[str, Any] | None:
    rows = await fetch(database_uri, "SELECT status, result FROM tasks WHERE id = $1", task_id)
    if rows[0]["status"] not in ("completed", "discarded", "cancelled"):
        return None
    return {"status": rows[0]["status"], "result": json.loads(rows[0]["result"] or "null")}


async def test_fan_out_across_two_workers_then_a_kill_between_steps(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    """One pair of worker processes (they are slow to start) for both stories:
    - a parent fans out 500 children across both workers and gathers every result exactly once;
    - a three-step task whose worker is killed (SIGKILL) during step three resumes at step three on
      the other worker: steps one and two never run again (counted by their side effects)."""
    app = await serving(ROLES=["api", "scheduler"], LEASE_SECONDS=2)
    client = app.test_client()
    await client.put(
        "/api/queues/crash", json={"min_backoff_s": 0.1, "max_backoff_s": 0.2}, headers=auth_headers
    )
    workers = [
        spawn_worker(clean_database, tmp_path / f"w{i}", WORKER_CONCURRENCY="20", LEASE_SECONDS="2")
        for i in range(2)
    ]
    try:
        await started(*workers)
        children = tmp_path / "children.txt"
        parent = await enqueue(
            client, auth_headers, kind="test.fanout", payload={"children": 500, "path": str(children)}
        )
        fanned = await eventually(lambda: _finished(clean_database, parent["id"]), timeout=90)

        steps = tmp_path / "steps.txt"
        task = await enqueue(
            client, auth_headers, kind="test.steps", queue="crash", payload={"path": str(steps), "hold_s": 60}
        )
        # step three has started: one and two succeeded, and were stored before it began
        started_three = await eventually(
            lambda: [line for line in lines(steps) if " three " in line], timeout=30
        )
        victim = next(w for w in workers if w.pid == int(started_three[0].split()[2]))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        await fetch(clean_database, "UPDATE tasks SET payload = jsonb_set(payload, '{hold_s}', '0')")
        resumed = await eventually(lambda: _finished(clean_database, task["id"]), timeout=60)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=30)

    assert fanned == {"status": "completed", "result": {"sum": sum(i * 2 for i in range(500)), "count": 500}}
    runs = [line.split() for line in lines(children)]
    assert sorted(int(i) for _, i, _ in runs) == list(range(500))  # every child ran, exactly once
    assert len({pid for _, _, pid in runs}) == 2  # both workers took part
    done = await fetch(
        clean_database,
        "SELECT count(*) AS n FROM tasks WHERE parent_id = $1 AND status = 'completed'",
        parent["id"],
    )
    assert done[0]["n"] == 500

    assert resumed == {"status": "completed", "result": {"results": [1, 2, 3]}}
    assert Counter(line.split()[1] for line in lines(steps)) == {"one": 1, "two": 1, "three": 2}
    outcomes = await fetch(
        clean_database, "SELECT outcome FROM task_attempts WHERE task_id = $1 ORDER BY id", task["id"]
    )
    assert [r["outcome"] for r in outcomes] == ["lost", "completed"]
