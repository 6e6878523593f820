"""Real worker processes on one database: exactly once, crash recovery, graceful stop, global limits."""

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from tests.proxy import TcpProxy
from tests.task_harness import eventually, fetch, read_records, spawn_worker, started

Serving = Callable[..., Awaitable[Quart]]


async def batch(client: Any, headers: dict[str, str], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    created = []
    for start in range(0, len(tasks), 1000):
        response = await client.post(
            "/api/tasks/batch", json={"tasks": tasks[start : start + 1000]}, headers=headers
        )
        assert response.status_code == 201
        created += (await response.get_json())["items"]
    return created


async def count(database_uri: str, where: str) -> int:
    return int((await fetch(database_uri, f"SELECT count(*) AS n FROM tasks WHERE {where}"))[0]["n"])


def stop_all(workers: list[Any]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=30)


async def test_1000_tasks_across_two_workers_each_run_exactly_once(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    marks = tmp_path / "runs.txt"
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}", WORKER_CONCURRENCY="20") for i in range(2)]
    await started(*workers)
    await batch(client, auth_headers, [{"kind": "test.record", "payload": {"path": str(marks)}}] * 1000)
    try:
        await eventually(lambda: _all_done(clean_database), timeout=90)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        exit_codes = [worker.wait(timeout=30) for worker in workers]
    assert exit_codes == [0, 0]
    runs = read_records(marks)
    per_task = Counter(task_id for task_id, *_ in runs)
    assert len(per_task) == 1000
    assert set(per_task.values()) == {1}
    assert len({pid for _, _, pid, _, _ in runs}) == 2  # both processes took part
    assert await count(clean_database, "attempts <> 1") == 0


async def _all_done(database_uri: str) -> bool:
    return await count(database_uri, "status <> 'completed'") == 0


async def test_a_worker_killed_mid_task_loses_nothing(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    # the API and the lease rescuer run here; the victim and the survivor are real processes
    app = await serving(ROLES=["api", "scheduler"], LEASE_SECONDS=2)
    client = app.test_client()
    await client.put(
        "/api/queues/crash", json={"min_backoff_s": 0.1, "max_backoff_s": 0.2}, headers=auth_headers
    )
    marks = tmp_path / "runs.txt"
    created = await batch(
        client,
        auth_headers,
        [{"kind": "test.record", "queue": "crash", "payload": {"path": str(marks), "seconds": 60}}] * 5,
    )
    victim = spawn_worker(clean_database, tmp_path / "victim", LEASE_SECONDS="2")
    await started(victim)
    try:
        await eventually(lambda: _count_is(clean_database, "status = 'running'", 5), timeout=30)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        await fetch(clean_database, "UPDATE tasks SET payload = jsonb_set(payload, '{seconds}', '0.1')")
        survivor = spawn_worker(clean_database, tmp_path / "survivor", LEASE_SECONDS="2")
        try:
            await eventually(lambda: _all_done(clean_database), timeout=60)
        finally:
            survivor.send_signal(signal.SIGTERM)
            assert survivor.wait(timeout=30) == 0
    finally:
        stop_all([victim])
    for task in created:
        attempts = await fetch(
            clean_database,
            "SELECT attempt, outcome FROM task_attempts WHERE task_id = $1 ORDER BY id",
            task["id"],
        )
        assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "lost"), (2, "completed")]
    assert len(read_records(marks)) == 5


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _count_is(database_uri: str, where: str, n: int) -> bool:
    return await count(database_uri, where) == n


async def test_sigterm_drains_short_tasks_and_releases_long_ones(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    marks, begun = tmp_path / "runs.txt", tmp_path / "begun.txt"
    short = await batch(
        client,
        auth_headers,
        [{"kind": "test.record", "payload": {"path": str(marks), "seconds": 0.8, "started_path": str(begun)}}]
        * 3,
    )
    long = await batch(client, auth_headers, [{"kind": "sleep", "payload": {"seconds": 120}}] * 2)
    worker = spawn_worker(clean_database, tmp_path / "w", WORKER_SHUTDOWN_GRACE_S="3")
    await started(worker)
    try:
        # running in the table is not enough: a claim answered after SIGTERM is released unstarted
        await eventually(lambda: _count_is(clean_database, "status = 'running'", 5), timeout=30)
        await eventually(lambda: _lines(begun) == 3, timeout=30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        stop_all([worker])
    for task in short:
        row = (await fetch(clean_database, "SELECT status FROM tasks WHERE id = $1", task["id"]))[0]
        assert row["status"] == "completed"
    for task in long:
        row = (
            await fetch(
                clean_database, "SELECT status, attempts, worker_id FROM tasks WHERE id = $1", task["id"]
            )
        )[0]
        assert (row["status"], row["attempts"], row["worker_id"]) == ("available", 0, None)


async def test_max_concurrency_holds_across_two_workers(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"max_concurrency": 2}, headers=auth_headers)
    marks = tmp_path / "runs.txt"
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}") for i in range(2)]
    try:
        await started(*workers)  # both claim from the start: the limit is shared, not raced for
        await batch(
            client,
            auth_headers,
            [{"kind": "test.record", "queue": "narrow", "payload": {"path": str(marks), "seconds": 0.15}}]
            * 24,
        )
        await eventually(lambda: _all_done(clean_database), timeout=90)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        stop_all(workers)
    runs = read_records(marks)
    assert len(runs) == 24
    edges = sorted(
        [(start, 1) for *_, start, _ in runs] + [(end, -1) for *_, end in runs], key=lambda e: (e[0], e[1])
    )
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    assert peak == 2  # reached the limit, never beyond it
    assert len({pid for _, _, pid, _, _ in runs}) == 2


async def test_rate_limit_holds_across_two_workers(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put("/api/queues/slowly", json={"rate_limit_per_s": 5}, headers=auth_headers)
    marks = tmp_path / "runs.txt"
    await asyncio.sleep(1.0)  # let the bucket fill to its burst of 5
    await batch(
        client,
        auth_headers,
        [{"kind": "test.record", "queue": "slowly", "payload": {"path": str(marks)}}] * 15,
    )
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}") for i in range(2)]
    try:
        await eventually(lambda: _all_done(clean_database), timeout=60)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        stop_all(workers)
    starts = sorted(start for *_, start, _ in read_records(marks))
    # a burst of 5, then 5 per second: 15 tasks need at least ~2 s from the first start
    assert starts[-1] - starts[0] >= 1.6
    for i in range(len(starts)):
        window = [s for s in starts if starts[i] <= s < starts[i] + 1.0]
        assert len(window) <= 5 + 5 + 1


async def test_a_saturated_limited_queue_drains_and_never_holds_up_other_queues_timers(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    # A queue limited to 8 at a time is claimed again as soon as a completion frees room, and
    # while it is busy, a delayed task in another queue still becomes due and starts on time.
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"max_concurrency": 8}, headers=auth_headers)
    limited_marks, delayed_marks = tmp_path / "limited.txt", tmp_path / "delayed.txt"
    workers = [spawn_worker(clean_database, tmp_path / f"w{i}") for i in range(2)]
    try:
        await started(*workers)
        await batch(
            client,
            auth_headers,
            [{"kind": "test.record", "queue": "narrow", "payload": {"path": str(limited_marks)}}] * 250,
        )
        [delayed] = await batch(
            client,
            auth_headers,
            [{"kind": "test.record", "delay_s": 2, "payload": {"path": str(delayed_marks)}}],
        )
        await eventually(lambda: _all_done(clean_database), timeout=60)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        stop_all(workers)
    from datetime import datetime

    [(_, _, _, delayed_start, _)] = read_records(delayed_marks)
    due = datetime.fromisoformat(delayed["run_at"]).timestamp()
    # staged by the next poll tick (0.2 s here) whatever the narrow queue is doing
    assert delayed_start - due < 1.5
    starts = sorted(start for *_, start, _ in read_records(limited_marks))
    assert len(starts) == 250
    # claimed as room frees, not once per poll interval: no idle second while work is waiting
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 1.0


async def test_a_worker_cut_off_from_postgresql_stops_its_handler_before_the_lease_can_expire(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    # The worker reaches PostgreSQL through a proxy that freezes (no error, no reset: a stall).
    # Its heartbeats hang, so it must cancel its handler before the lease runs out; the rescuer
    # (here) then hands the task to a second worker, and the two executions never overlap.
    app = await serving(ROLES=["api", "scheduler"])
    client = app.test_client()
    await client.put(
        "/api/queues/fenced", json={"min_backoff_s": 0.1, "max_backoff_s": 0.2}, headers=auth_headers
    )
    proxy = TcpProxy.to_database(clean_database)
    await proxy.start()
    marks = tmp_path / "spans.txt"
    stalled = spawn_worker(proxy.uri, tmp_path / "stalled", LEASE_SECONDS="3")
    survivor = None
    try:
        await started(stalled)
        [task] = await batch(
            client,
            auth_headers,
            [{"kind": "test.span", "queue": "fenced", "payload": {"path": str(marks), "seconds": 30}}],
        )
        # held and running: its lease was renewed once (a claim whose answer the freeze caught
        # would never start; the rescuer's run would then be the only one)
        renewed = "status = 'running' AND lease_expires_at > started_at + interval '3.2 seconds'"
        await eventually(lambda: _count_is(clean_database, renewed, 1), timeout=30)
        proxy.freeze()
        frozen_at = time.time()
        # the rescued attempt will be short; its worker starts while the lease runs out
        await fetch(clean_database, "UPDATE tasks SET payload = jsonb_set(payload, '{seconds}', '0.2')")
        survivor = spawn_worker(clean_database, tmp_path / "survivor", LEASE_SECONDS="3")
        await eventually(lambda: len(read_records(marks)) >= 1, timeout=10)  # the handler was stopped
        await eventually(lambda: _all_done(clean_database), timeout=30)
    finally:
        proxy.resume()
        for worker in (stalled, survivor):
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
        stop_all([w for w in (stalled, survivor) if w is not None])
        await proxy.close()
    (first, second) = sorted(read_records(marks), key=lambda r: r[1])
    assert (first[1], second[1]) == (1, 2)
    assert first[2] == stalled.pid
    assert second[2] != stalled.pid
    assert first[4] < frozen_at + 3  # stopped while its lease (3 s) still held
    assert first[4] <= second[3]  # never two executions at once
    attempts = await fetch(
        clean_database,
        "SELECT attempt, outcome FROM task_attempts WHERE task_id = $1 ORDER BY id",
        task["id"],
    )
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "lost"), (2, "completed")]


async def test_sigterm_stops_a_worker_process_within_one_grace_period(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    [task] = await batch(client, auth_headers, [{"kind": "sleep", "payload": {"seconds": 60}}])
    worker = spawn_worker(clean_database, tmp_path / "w", WORKER_SHUTDOWN_GRACE_S="1")
    try:
        await started(worker)
        # its handler runs (it reports progress each second): claimed is not yet started, and a
        # task claimed but not started is handed back at once
        await eventually(lambda: _count_is(clean_database, "progress IS NOT NULL", 1), timeout=30)
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 10)
        elapsed = time.monotonic() - signalled
    finally:
        stop_all([worker])
    assert code == 0
    assert 1.0 <= elapsed < 2.0  # the running task had its grace, and the stop no more than one
    [row] = await fetch(clean_database, "SELECT status, attempts FROM tasks WHERE id = $1", task["id"])
    assert (row["status"], row["attempts"]) == ("available", 0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_a_second_stop_signal_ends_a_worker_processs_grace_and_hands_its_tasks_back(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path, signum: int
) -> None:
    # serve already ends its grace on a second Ctrl-C; `python -m app worker` ignored it and sat
    # out the whole grace (30 s here) with its handlers running
    app = await serving(ROLES=["api"])
    client = app.test_client()
    [task] = await batch(client, auth_headers, [{"kind": "sleep", "payload": {"seconds": 120}}])
    worker = spawn_worker(clean_database, tmp_path / "w", WORKER_SHUTDOWN_GRACE_S="30")
    log = worker.log_path  # type: ignore[attr-defined]
    try:
        await started(worker)
        await eventually(lambda: _count_is(clean_database, "progress IS NOT NULL", 1), timeout=30)
        worker.send_signal(signum)
        await eventually(lambda: "waiting for running tasks" in log.read_text(), timeout=10)
        signalled = time.monotonic()
        worker.send_signal(signum)
        code = await asyncio.to_thread(worker.wait, 10)
        elapsed = time.monotonic() - signalled
    finally:
        stop_all([worker])
    assert code == 0, log.read_text()
    assert elapsed < 2.5, (elapsed, log.read_text())  # the unwinding and the last writes, no grace
    assert "Traceback" not in log.read_text()
    # handed back, its attempt not spent: not left running until its lease expires
    [row] = await fetch(clean_database, "SELECT status, attempts FROM tasks WHERE id = $1", task["id"])
    assert (row["status"], row["attempts"]) == ("available", 0)


async def test_sigterm_stops_a_worker_process_within_one_grace_period_while_postgresql_stalls(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    # The loops the stop cancels were in statements on a frozen connection: each was released only
    # when its cancel was confirmed or DB_COMMAND_TIMEOUT_S ran out (15 s for a grace of 1 s).
    app = await serving(ROLES=["api"])
    client = app.test_client()
    await batch(client, auth_headers, [{"kind": "sleep", "payload": {"seconds": 60}}])
    proxy = TcpProxy.to_database(clean_database)
    await proxy.start()
    worker = spawn_worker(proxy.uri, tmp_path / "w", WORKER_SHUTDOWN_GRACE_S="1", DB_COMMAND_TIMEOUT_S="10")
    try:
        await started(worker)
        await eventually(lambda: _count_is(clean_database, "status = 'running'", 1), timeout=30)
        proxy.freeze()
        await asyncio.sleep(0.5)  # the worker's next statements are under way, and hang
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 30)
        elapsed = time.monotonic() - signalled
    finally:
        stop_all([worker])
        proxy.resume()
        await proxy.close()
    log = worker.log_path.read_text()  # type: ignore[attr-defined]
    assert code == 0, log
    # the grace, then the unwinding and the last writes, each bounded; nothing is waited for past it
    assert elapsed < 2.5, (elapsed, log)
    assert "Traceback" not in log
    # what could not be handed back is left to its lease, as when the process is killed
    assert await count(clean_database, "status = 'running'") == 1
