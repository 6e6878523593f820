"""Flow control by key with two real worker processes on one PostgreSQL: what a user would see."""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.integration.flow.test_keyed_claim import batch
from tests.integration.test_worker_processes import Serving, count, stop_all
from tests.task_harness import eventually, fetch, read_records, spawn_worker, started


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    times = sorted(times)
    return max((sum(1 for t in times if start <= t < start + window_s) for start in times), default=0)


async def keys_of(database_uri: str) -> dict[str, str]:
    rows = await fetch(database_uri, "SELECT id::text AS id, concurrency_key FROM tasks")
    return {row["id"]: row["concurrency_key"] for row in rows}


def stop(workers: list[Any]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    stop_all(workers)


async def test_key_concurrency_2_holds_across_two_workers_while_other_keys_run(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put("/api/queues/tenants", json={"key_concurrency": 2}, headers=auth_headers)
    marks = tmp_path / "runs.txt"
    # three tasks at a time each: the six the keys allow need both workers
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}", WORKER_CONCURRENCY="3") for i in range(2)]
    try:
        await started(*workers)
        await batch(
            client,
            auth_headers,
            [
                {
                    "kind": "test.record",
                    "queue": "tenants",
                    "concurrency_key": key,
                    "payload": {"path": str(marks), "seconds": 0.2},
                }
                for key in ("acme", "globex", "initech")
                for _ in range(8)
            ],
        )
        await eventually(lambda: _done(clean_database), timeout=60)
    finally:
        stop(workers)
    runs = read_records(marks)
    assert len(runs) == 24
    key_of = await keys_of(clean_database)
    per_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for task_id, _, _, start, end in runs:
        per_key[key_of[task_id]].append((start, end))
    assert {key: peak_overlap(spans) for key, spans in per_key.items()} == {
        "acme": 2,
        "globex": 2,
        "initech": 2,
    }
    assert peak_overlap([(s, e) for *_, s, e in runs]) > 2  # other keys ran meanwhile
    assert len({pid for _, _, pid, _, _ in runs}) == 2  # both workers took part


async def _done(database_uri: str) -> bool:
    return await count(database_uri, "status <> 'completed'") == 0


async def test_fifty_small_keys_start_before_the_big_keys_200th_task(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put(
        "/api/queues/fair", json={"key_concurrency": 10_000, "paused": True}, headers=auth_headers
    )
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    await batch(
        client,
        auth_headers,
        [{"kind": "test.record", "queue": "fair", "concurrency_key": "big", "payload": {"path": str(big)}}]
        * 10_000,
    )
    await batch(
        client,
        auth_headers,
        [
            {
                "kind": "test.record",
                "queue": "fair",
                "concurrency_key": f"small-{i}",
                "payload": {"path": str(small)},
            }
            for i in range(50)
        ],
    )
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}") for i in range(2)]
    try:
        await started(*workers)
        await client.post("/api/queues/fair/resume", headers=auth_headers)
        await eventually(lambda: len(read_records(small)) == 50 and len(read_records(big)) >= 200, timeout=60)
    finally:
        stop(workers)
    big_starts = sorted(start for *_, start, _ in read_records(big))
    small_starts = [start for *_, start, _ in read_records(small)]
    assert max(small_starts) < big_starts[199]


async def test_key_rate_limit_5_runs_at_most_5_per_rolling_second_per_key(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put("/api/queues/paced", json={"key_rate_limit_per_s": 5}, headers=auth_headers)
    marks = tmp_path / "runs.txt"
    workers = [
        spawn_worker(clean_database, tmp_path / f"w{i}", WORKER_POLL_INTERVAL_S="0.05") for i in range(2)
    ]
    try:
        await started(*workers)
        await batch(
            client,
            auth_headers,
            [
                {
                    "kind": "test.record",
                    "queue": "paced",
                    "concurrency_key": key,
                    "payload": {"path": str(marks)},
                }
                for key in ("a", "b", "c")
                for _ in range(14)
            ],
        )
        await eventually(lambda: _done(clean_database), timeout=60)
    finally:
        stop(workers)
    key_of = await keys_of(clean_database)
    handler_starts: dict[str, list[float]] = defaultdict(list)
    for task_id, _, _, start, _ in read_records(marks):
        handler_starts[key_of[task_id]].append(start)
    rows = await fetch(
        clean_database, "SELECT concurrency_key, extract(epoch FROM started_at)::float8 AS at FROM tasks"
    )
    claimed: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        claimed[row["concurrency_key"]].append(row["at"])
    for key in ("a", "b", "c"):
        assert len(handler_starts[key]) == 14
        assert max_in_window(claimed[key]) <= 5  # as the database started them
        assert max_in_window(handler_starts[key]) <= 5 + 5  # as the handlers saw it: one batch of slack
        # and it is a rate, not a stall: 14 starts need a little over 2 s, not much more
        assert 2.0 <= max(claimed[key]) - min(claimed[key]) < 5.0
