"""The worker in this process against a real PostgreSQL: outcomes, retries, pausing, cancelling."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from quart import Quart

from tests.conftest import driver_uri
from tests.integration.flow.test_keyed_claim import batch
from tests.task_harness import claims_fail_in, enqueue, eventually, fetch, read_records

Serving = Callable[..., Awaitable[Quart]]
WORKER = {"ROLES": ["api", "worker"]}


async def task_status(client: Any, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get(f"/api/tasks/{task_id}", headers=headers)).get_json()
    return body


async def test_a_task_runs_and_wait_returns_the_result(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 0.3})
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    assert done["result"] == {"slept_s": 0.3}
    assert done["attempts"] == 1
    attempts = (
        await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    )["items"]
    assert [a["outcome"] for a in attempts] == ["completed"]
    assert attempts[0]["duration_ms"] >= 300


async def test_retries_follow_backoff_and_end_in_discarded(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/retrying", json={"min_backoff_s": 0.2, "max_backoff_s": 0.4}, headers=auth_headers
    )
    task = await enqueue(
        client, auth_headers, kind="test.flaky", queue="retrying", payload={"fail_times": 9}, max_attempts=3
    )
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    assert done["status"] == "discarded"
    assert done["attempts"] == 3
    assert "boom on attempt 3" in done["last_error"]
    attempts = (
        await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    )["items"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert all(a["outcome"] == "failed" for a in attempts)
    from datetime import datetime

    starts = [datetime.fromisoformat(a["started_at"]) for a in attempts]
    ends = [datetime.fromisoformat(a["finished_at"]) for a in attempts]
    for i in (1, 2):
        assert (starts[i] - ends[i - 1]).total_seconds() >= 0.19  # never sooner than min backoff


async def test_a_flaky_task_completes_on_a_later_attempt(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/fast", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    task = await enqueue(client, auth_headers, kind="test.flaky", queue="fast", payload={"fail_times": 2})
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    assert done["attempts"] == 3
    assert done["last_error"] is None  # a completed task shows no stale error; its attempts keep theirs
    attempts = (
        await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    )["items"]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "completed"]
    assert attempts[1]["error"] == "RuntimeError: boom on attempt 2"
    # the operator sees where it was raised: the handler's frame and the exception line
    trace = attempts[1]["traceback"]
    assert trace.startswith("Traceback (most recent call last):")
    assert 'tests/kinds.py", line' in trace
    assert "in flaky" in trace
    assert trace.rstrip().endswith("RuntimeError: boom on attempt 2")
    assert attempts[2]["traceback"] is None


async def test_retry_after_reported_by_a_kind_is_honoured(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/polite", json={"min_backoff_s": 0.01, "max_backoff_s": 5}, headers=auth_headers
    )
    task = await enqueue(
        client,
        auth_headers,
        kind="test.flaky",
        queue="polite",
        payload={"fail_times": 1, "retry_after_s": 1.0},
    )
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    attempts = (
        await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    )["items"]
    from datetime import datetime

    gap = datetime.fromisoformat(attempts[1]["started_at"]) - datetime.fromisoformat(
        attempts[0]["finished_at"]
    )
    assert gap.total_seconds() >= 0.95


async def test_a_permanent_error_discards_at_once(serving: Serving, auth_headers: dict[str, str]) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="test.flaky", payload={"fail_times": 5, "permanent": True}
    )
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    assert done["status"] == "discarded"
    assert done["attempts"] == 1


async def test_a_paused_queue_holds_its_tasks(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    paused = await client.post("/api/queues/held/pause", headers=auth_headers)
    assert paused.status_code == 404  # not created yet
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)
    marks = tmp_path / "held.txt"
    task = await enqueue(client, auth_headers, kind="test.record", queue="held", payload={"path": str(marks)})
    other = await enqueue(client, auth_headers, kind="noop")
    assert (await (await client.get(f"/api/tasks/{other['id']}?wait=10", headers=auth_headers)).get_json())[
        "status"
    ] == "completed"
    await asyncio.sleep(0.6)  # several poll intervals
    assert (await task_status(client, auth_headers, task["id"]))["status"] == "available"
    assert not marks.exists()
    queue = await (await client.get("/api/queues/held", headers=auth_headers)).get_json()
    assert queue["paused"] is True
    assert queue["counts"] == {"available": 1}
    assert queue["oldest_available_age_s"] >= 0.5
    await client.post("/api/queues/held/resume", headers=auth_headers)
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    assert len(read_records(marks)) == 1


async def test_a_resumed_limited_queue_runs_without_waiting_for_the_poll_interval(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    # a poll interval far longer than the wait below: only the resume's NOTIFY can start the task
    app = await serving(**WORKER, WORKER_POLL_INTERVAL_S=30.0)
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"paused": True, "max_concurrency": 2}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="noop", queue="narrow")
    other = await enqueue(client, auth_headers, kind="noop")
    assert (await (await client.get(f"/api/tasks/{other['id']}?wait=10", headers=auth_headers)).get_json())[
        "status"
    ] == "completed"
    await client.post("/api/queues/narrow/resume", headers=auth_headers)
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=5", headers=auth_headers)).get_json()
    assert done["status"] == "completed"


async def test_a_payload_broken_after_enqueue_discards_cleanly(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put("/api/queues/later", json={"paused": True}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="sleep", queue="later", payload={"seconds": 0.1})
    await fetch(
        clean_database, 'UPDATE tasks SET payload = \'{"seconds": "soon"}\' WHERE id = $1', task["id"]
    )
    await client.post("/api/queues/later/resume", headers=auth_headers)
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "discarded"
    assert done["attempts"] == 1
    assert "no longer matches the contract of kind 'sleep'" in done["last_error"]
    healthy = await enqueue(client, auth_headers, kind="noop")
    after = await (await client.get(f"/api/tasks/{healthy['id']}?wait=10", headers=auth_headers)).get_json()
    assert after["status"] == "completed"  # the worker is still alive


async def test_cancelling_a_running_task_is_cooperative(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 30})
    await eventually(lambda: _status_is(client, auth_headers, task["id"], "running"))
    accepted = await (await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)).get_json()
    assert accepted["status"] == "running"  # asked, not forced
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "cancelled"
    assert done["last_error"].startswith("cancelled after")


async def _status_is(client: Any, headers: dict[str, str], task_id: str, status: str) -> bool:
    return bool((await task_status(client, headers, task_id))["status"] == status)


async def test_events_stream_status_changes_and_progress(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put("/api/queues/events", json={"paused": True}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="sleep", queue="events", payload={"seconds": 2.2})
    events: list[dict[str, Any]] = []

    async def consume() -> None:
        import json

        async with client.request(f"/api/tasks/{task['id']}/events", headers=auth_headers) as connection:
            await connection.send_complete()
            buffer = b""
            while True:
                chunk = await connection.receive()
                buffer += chunk
                while b"\n\n" in buffer:
                    message, buffer = buffer.split(b"\n\n", 1)
                    for line in message.decode().splitlines():
                        if line.startswith("data: "):
                            events.append(json.loads(line[6:]))
                if events and events[-1]["status"] in ("completed", "discarded", "cancelled"):
                    return

    consumer = asyncio.create_task(consume())
    await eventually(lambda: len(events) >= 1)
    await client.post("/api/queues/events/resume", headers=auth_headers)
    await asyncio.wait_for(consumer, timeout=20)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "available"
    assert "running" in statuses
    assert statuses[-1] == "completed"
    assert any(e["progress"] == {"slept_s": 1.0} for e in events)


async def test_lifecycle_starts_in_order_and_stops_in_reverse(settings: Any, clean_database: str) -> None:
    from app import create_app

    app = create_app(settings.model_copy(update={"ROLES": ["api", "worker", "scheduler"]}))
    runtime = app.extensions["taskgate"]
    async with app.test_app():
        assert runtime.events == [
            "database started",
            "notifier started",
            "outbound http started",
            "worker started",
            "scheduler started",
        ]
        ready = await (await app.test_client().get("/api/common/ready")).get_json()
        assert ready["checks"] == {"database": True, "migrations": True, "worker": True, "scheduler": True}
    assert runtime.events[5:] == [
        "scheduler stopped",
        "worker stopped",
        "outbound http stopped",
        "notifier stopped",
        "database stopped",
    ]


async def test_task_metrics_are_exported(serving: Serving, auth_headers: dict[str, str]) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="noop", queue="metered")
    await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)
    await eventually(
        lambda: _metrics_have(
            client, 'taskgate_task_outcomes_total{kind="noop",outcome="completed",queue="metered"}'
        )
    )
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert 'taskgate_tasks_enqueued_total{kind="noop",queue="metered"}' in text
    assert 'taskgate_task_start_lag_seconds_bucket{le="0.005",queue="metered"}' in text


async def test_retried_attempts_and_durations_are_told_apart_in_metrics(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/twice", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
    )
    task = await enqueue(client, auth_headers, kind="test.flaky", queue="twice", payload={"fail_times": 1})
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    for line in (
        'taskgate_task_outcomes_total{kind="test.flaky",outcome="retried",queue="twice"} 1.0',
        'taskgate_task_outcomes_total{kind="test.flaky",outcome="completed",queue="twice"} 1.0',
        'taskgate_task_duration_seconds_count{kind="test.flaky",queue="twice"} 2.0',
    ):
        await eventually(lambda line=line: _metrics_have(client, line))
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert "taskgate_worker_capacity_tasks" in text


async def _metrics_have(client: Any, line: str) -> bool:
    return line in await (await client.get("/metrics")).get_data(as_text=True)


async def test_log_lines_written_by_a_task_carry_its_ids(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    import structlog
    from structlog.testing import LogCapture

    captured = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, captured])
    try:
        app = await serving(**WORKER)
        client = app.test_client()
        task = await enqueue(
            client, auth_headers, kind="test.flaky", payload={"fail_times": 1}, max_attempts=1
        )
        await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)
    finally:
        structlog.reset_defaults()
    failed = [e for e in captured.entries if e["event"] == "task failed"]
    assert failed, captured.entries[-5:]
    assert failed[0]["task_id"] == task["id"]
    assert failed[0]["client_id"]
    # nothing leaks into lines written outside the task
    assert all(
        "task_id" not in e for e in captured.entries if e["event"] in ("runtime started", "worker started")
    )


async def test_a_result_postgresql_cannot_store_fails_its_task_and_only_its_task(
    serving: Any, auth_headers: dict[str, str]
) -> None:
    app = await serving(ROLES=["api", "worker"])
    client = app.test_client()
    bad = await enqueue(client, auth_headers, kind="test.returns", payload={"value": "x", "nul": True})
    exact = await client.post(  # a payload integer beyond 64 bits is stored exactly, too
        "/api/tasks", json={"kind": "noop", "payload": {"n": 2**70 + 1}}, headers=auth_headers
    )
    assert json.loads(await exact.get_data(as_text=True))["payload"] == {"n": 2**70 + 1}
    good = await enqueue(client, auth_headers, kind="test.returns", payload={"value": "y", "big": True})

    async def finished(task_id: str) -> dict[str, Any] | None:
        body: dict[str, Any] = await (
            await client.get(f"/api/tasks/{task_id}", headers=auth_headers)
        ).get_json()
        return body if body["status"] in ("completed", "discarded") else None

    failed = await eventually(lambda: finished(bad["id"]))
    assert failed["status"] == "discarded"
    assert "NUL" in failed["last_error"]
    done = await eventually(lambda: finished(good["id"]))
    assert done["status"] == "completed"
    read = await client.get(f"/api/tasks/{good['id']}", headers=auth_headers)
    assert json.loads(await read.get_data(as_text=True))["result"] == {"value": "y", "big": 2**70 + 1}


async def test_an_in_process_result_past_8_mib_fails_its_task_for_good_with_a_clear_error(
    serving: Any, auth_headers: dict[str, str]
) -> None:
    """A remote worker's result is bounded by the 8 MiB request body; an in-process handler's had no
    bound (a parent's gather loads every child's result). Past 8 MiB of JSON it now fails its task
    for good, saying why; at the bound it completes."""
    app = await serving(ROLES=["api", "worker"])
    client = app.test_client()
    limit = 8 * 1024 * 1024
    # {"value":"…"} is 12 bytes of JSON around the text
    over = await enqueue(client, auth_headers, kind="test.returns", payload={"value": "", "pad": limit - 11})
    at = await enqueue(client, auth_headers, kind="test.returns", payload={"value": "", "pad": limit - 12})

    async def finished(task_id: str) -> dict[str, Any] | None:
        body: dict[str, Any] = await (
            await client.get(f"/api/tasks/{task_id}", headers=auth_headers)
        ).get_json()
        return body if body["status"] in ("completed", "discarded") else None

    failed = await eventually(lambda: finished(over["id"]), timeout=30)
    assert (failed["status"], failed["attempts"], failed["result"]) == ("discarded", 1, None)
    assert failed["last_error"] == (
        f"the handler's result is {limit + 1} bytes of JSON, past the {limit} a result may hold:"
        " store large data elsewhere and return a reference to it"
    )
    done = await eventually(lambda: finished(at["id"]), timeout=30)
    assert done["status"] == "completed"


async def test_exceptions_a_handler_raises_itself_fail_its_attempt_and_the_worker_goes_on(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """A CancelledError from inside a handler (it awaited a cancelled sub-task) once ended the
    attempt with nothing written and its slot never freed: with one slot the worker stalled."""
    app = await serving(**WORKER, WORKER_CONCURRENCY=1)
    client = app.test_client()
    inner = await enqueue(client, auth_headers, kind="test.raises", payload={"what": "inner_cancel"})
    own_timeout = await enqueue(client, auth_headers, kind="test.raises", payload={"what": "timeout"})
    after = await enqueue(client, auth_headers, kind="noop")
    for task, error in ((inner, "CancelledError"), (own_timeout, "TimeoutError: the handler's own call")):
        done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
        assert done["status"] == "discarded", done
        assert done["last_error"].startswith(error), done["last_error"]
        [attempt] = (
            await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
        )["items"]
        assert "Traceback (most recent call last)" in attempt["traceback"]
    finished = await (await client.get(f"/api/tasks/{after['id']}?wait=10", headers=auth_headers)).get_json()
    assert finished["status"] == "completed"


async def test_a_handler_slow_to_unwind_does_not_hold_up_the_stop_or_the_other_completions(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Cancelled at the end of the grace, a handler whose cleanup takes 4 s once held the whole
    stop (and every other completion) for those 4 s. Its task is left to its lease, not released
    while it still runs."""
    import time
    from uuid import UUID

    app = await serving(**WORKER, WORKER_CONCURRENCY=2)
    client = app.test_client()
    slow = await enqueue(
        client, auth_headers, kind="test.slow_unwind", payload={"seconds": 60, "unwind_s": 4}
    )
    quick = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 0.3})

    async def both_running() -> bool:
        rows = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE status = 'running'")
        return bool(rows[0]["n"] == 2)

    await eventually(both_running)
    worker = app.extensions["taskgate"].worker
    started = time.monotonic()
    await worker.stop(grace_s=0.6)
    assert time.monotonic() - started < 2.0
    rows = {r["id"]: r["status"] for r in await fetch(clean_database, "SELECT id, status FROM tasks")}
    assert rows[UUID(quick["id"])] == "completed"  # finished within the grace, and written
    assert rows[UUID(slow["id"])] == "running"  # still unwinding here: left to its lease


async def test_a_limited_queue_runs_while_an_unlimited_queue_keeps_the_worker_busy(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """A round asked the unlimited queues first and the limited queues only while it still had
    room: while an unlimited queue's backlog filled every round, a limited queue's task waited
    until that backlog was gone, however long it was."""
    app = await serving(**WORKER, WORKER_CONCURRENCY=4, WORKER_BATCH_SIZE=4, WORKER_POLL_INTERVAL_S=0.2)
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"max_concurrency": 2}, headers=auth_headers)
    marks = tmp_path / "bulk.txt"
    backlog = [{"kind": "test.record", "queue": "bulk", "payload": {"path": str(marks), "seconds": 0.1}}]
    await batch(client, auth_headers, backlog * 400)  # 10 s of work for 4 slots
    await eventually(marks.exists, timeout=10)
    task = await enqueue(client, auth_headers, kind="noop", queue="narrow")
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=5", headers=auth_headers)).get_json()
    assert done["status"] == "completed"
    assert len(read_records(marks)) < 200  # long before the backlog was gone


async def test_a_limited_queue_that_cannot_be_claimed_holds_up_no_other_queue(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A claim round is several statements, each committing what it claims. One limited queue's
    claim failed at every round (seen with a key rate window PostgreSQL could not compute; here a
    trigger makes it fail), and the round with it: the tasks claimed before it in the round were
    never run, each lost an attempt to its lease at every round and was discarded without having
    run once, whichever client it belonged to; the queues after it were never claimed."""
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put("/api/queues/broken", json={"max_concurrency": 5}, headers=auth_headers)
    await client.put("/api/queues/narrow", json={"max_concurrency": 2}, headers=auth_headers)
    async with claims_fail_in(clean_database, "broken"):
        stuck = await enqueue(client, auth_headers, kind="noop", queue="broken")
        others = [
            await enqueue(client, auth_headers, kind="noop", max_attempts=1),
            await enqueue(client, auth_headers, kind="noop", queue="narrow", max_attempts=1),
        ]
        for task in others:
            done = await (
                await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)
            ).get_json()
            assert (done["status"], done["attempts"]) == ("completed", 1), done
        assert (await task_status(client, auth_headers, stuck["id"]))["status"] == "available"
    done = await (await client.get(f"/api/tasks/{stuck['id']}?wait=10", headers=auth_headers)).get_json()
    assert (done["status"], done["attempts"]) == ("completed", 1)  # claimed once the fault is gone


async def test_tasks_claimed_before_the_limited_queues_cannot_be_read_still_run(
    serving: Serving, auth_headers: dict[str, str], monkeypatch: Any
) -> None:
    """A round claims the unlimited queues, then reads which queues are limited. When that read
    failed, the round failed and the tasks it had already claimed were never started: each waited
    out its lease, lost an attempt, and was claimed (and lost) again until discarded."""
    from app.src.database import tasks as task_store

    async def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionResetError("injected: the connection was reset")

    monkeypatch.setattr(task_store, "limited_queues", unreadable)
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="noop", payload={})
    await eventually(lambda: _status_is(client, auth_headers, task["id"], "completed"), timeout=4)
    attempts = await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    assert [a["outcome"] for a in attempts["items"]] == ["completed"]


async def test_a_claim_round_past_its_deadline_hands_back_what_it_claimed(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A claim round is bounded by the lease it sets. On a slow database (here a limited queue's
    claim waits for its queue row, each statement within its own deadline, the round not), the
    tasks its first statement had claimed were left to their leases: each lost an attempt, and one
    on its last was discarded without having run."""
    app = await serving(**WORKER, LEASE_SECONDS=2)  # a round has 1 s (the lease less its margin)
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"max_concurrency": 2}, headers=auth_headers)
    # the narrow queue's task due first (its claim then waits for the locked queue row at every
    # round), the other a moment later: a round claims it, then waits for the narrow queue
    await enqueue(client, auth_headers, kind="noop", queue="narrow", delay_s=0.5)
    task = await enqueue(client, auth_headers, kind="noop", max_attempts=1, delay_s=1.5)
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM queues WHERE name = 'narrow' FOR UPDATE")
            await asyncio.sleep(3.5)  # rounds past their deadline, each statement within its own
    finally:
        await conn.close()
    # handed back unspent and claimed again (before: left running until its lease expired)
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)).get_json()
    assert (done["status"], done["attempts"]) == ("completed", 1), done
    attempts = await (await client.get(f"/api/tasks/{task['id']}/attempts", headers=auth_headers)).get_json()
    assert [a["outcome"] for a in attempts["items"]] == ["completed"]


async def test_a_claim_round_cut_short_by_the_stop_hands_back_what_it_claimed(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A stop cancels a claim round still running at the end of its grace (a slow database: here a
    limited queue's claim waits for its queue row): the tasks its first statement had claimed were
    left to their leases, each losing an attempt."""
    app = await serving(**WORKER, DB_COMMAND_TIMEOUT_S=20)
    client = app.test_client()
    await client.put("/api/queues/narrow", json={"max_concurrency": 2}, headers=auth_headers)
    # due together: one round claims the first, then waits for the narrow queue's locked row
    due = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    task = await enqueue(client, auth_headers, kind="noop", run_at=due)
    await enqueue(client, auth_headers, kind="noop", queue="narrow", run_at=due)
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM queues WHERE name = 'narrow' FOR UPDATE")

            async def claimed() -> bool:
                rows = await fetch(clean_database, "SELECT status FROM tasks WHERE id = $1", task["id"])
                return rows[0]["status"] == "running"

            await eventually(claimed, timeout=5)
            await app.extensions["taskgate"].worker.stop(grace_s=0.2)
            rows = await fetch(clean_database, "SELECT status, attempts FROM tasks WHERE id = $1", task["id"])
            assert [(r["status"], r["attempts"]) for r in rows] == [("available", 0)]
    finally:
        await conn.close()


async def test_a_task_asked_to_stop_that_outlives_the_grace_is_cancelled_not_released(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A worker stopping releases what it could not finish; a task whose cancel was requested while
    it ran (its handler never looked) was released to `available` like the others, and another
    worker ran it again after the cancel had been accepted."""
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="test.slow_unwind", payload={"seconds": 60, "unwind_s": 0}
    )
    other = await enqueue(
        client, auth_headers, kind="test.slow_unwind", payload={"seconds": 60, "unwind_s": 0}
    )
    await eventually(lambda: _status_is(client, auth_headers, task["id"], "running"))
    await eventually(lambda: _status_is(client, auth_headers, other["id"], "running"))
    asked = await (await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)).get_json()
    assert asked["status"] == "running"
    await app.extensions["taskgate"].worker.stop(grace_s=0.3)
    cancelled = await task_status(client, auth_headers, task["id"])
    assert (cancelled["status"], cancelled["finished_at"] is not None) == ("cancelled", True)
    released = await task_status(client, auth_headers, other["id"])
    assert (released["status"], released["attempts"]) == ("available", 0)  # not asked: back in line


async def test_the_first_failure_after_suspensions_or_a_retry_by_hand_backs_off_as_a_first_failure(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Backoff grows with the failures of a task's life, not with its attempt number: a composed
    task's suspensions (an SDK kind suspends at every new step) and a retry by hand move the
    attempt number on without failing. Counted from the attempt number, the first failure of a
    task at attempt 21 was retried after up to min_backoff * 2^20 s (the queue's max, an hour)
    instead of min_backoff."""
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/composed",
        json={"min_backoff_s": 0.5, "max_backoff_s": 3600, "paused": True},
        headers=auth_headers,
    )
    task = await enqueue(
        client, auth_headers, kind="test.flaky", queue="composed", payload={"fail_times": 99}, max_attempts=3
    )
    # as after 20 suspensions (SUSPEND: attempts, max_attempts and the retry base move on together)
    await fetch(
        clean_database,
        "UPDATE tasks SET attempts = 20, max_attempts = 23, attempts_before_retry = 20, durable = true",
    )
    await client.post("/api/queues/composed/resume", headers=auth_headers)
    await eventually(lambda: _status_is(client, auth_headers, task["id"], "retryable"))
    [row] = await fetch(
        clean_database,
        "SELECT EXTRACT(epoch FROM t.run_at - a.finished_at)::float8 AS backoff_s, t.attempts "
        "FROM tasks t JOIN task_attempts a ON a.task_id = t.id",
    )
    assert row["attempts"] == 21
    assert row["backoff_s"] < 1.5, row  # min_backoff 0.5 s: the first failure of this life


async def test_a_durable_task_whose_state_cannot_be_loaded_fails_alone_and_clearly(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """The stored state of the durable tasks of a claim is loaded in one statement after the claim.
    When it failed (here a wait record that is no time), every task of that claim, durable or not,
    was left running unstarted until its lease expired, and lost an attempt ('lease expired'),
    claim after claim while the bad one was claimed with them: plain tasks were discarded without
    ever running. Now the others run, and the task whose state cannot be loaded fails its attempt
    saying why."""
    app = await serving(**WORKER)
    client = app.test_client()
    await client.put(
        "/api/queues/mixed", json={"paused": True, "min_backoff_s": 60, "max_backoff_s": 60},
        headers=auth_headers,
    )  # fmt: skip
    broken = await enqueue(client, auth_headers, kind="test.nap", queue="mixed", payload={"seconds": 1})
    plain = [await enqueue(client, auth_headers, kind="noop", queue="mixed", payload={}) for _ in range(3)]
    await fetch(clean_database, f"UPDATE tasks SET durable = true WHERE id = '{broken['id']}'")
    await fetch(
        clean_database,
        "INSERT INTO task_steps (task_id, name, result, wait) "
        f"""VALUES ('{broken["id"]}', 'nap', '{{"sleep_until": "not a time"}}', true)""",
    )
    await client.post("/api/queues/mixed/resume", headers=auth_headers)
    for task in plain:
        done = await (await client.get(f"/api/tasks/{task['id']}?wait=3", headers=auth_headers)).get_json()
        assert (done["status"], done["attempts"]) == ("completed", 1), done
    await eventually(lambda: _status_is(client, auth_headers, broken["id"], "retryable"), timeout=3)
    failed = await task_status(client, auth_headers, broken["id"])
    assert "stored state could not be loaded" in failed["last_error"], failed["last_error"]
