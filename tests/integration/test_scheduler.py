"""The scheduler against a real PostgreSQL: firing exactly once, coalescing, readiness, shutdown, pruning."""

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
import structlog.testing
from quart import Quart

from app.database import Database
from app.scheduler import Job, Scheduler, autovacuum_advice
from app.settings import Settings
from app.src.api import schedules
from app.src.api.engine.task_engine import TaskEngine
from app.src.database import maintenance
from tests.conftest import engine_over
from tests.task_harness import eventually, fetch

Serving = Callable[..., Awaitable[Quart]]


async def count(database_uri: str, query: str, *args: Any) -> int:
    return int((await fetch(database_uri, query, *args))[0][0])


async def make_schedule(client: Any, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/api/schedules", json={"name": "s", "task": {"kind": "noop"}, **body}, headers=headers
    )
    assert response.status_code == 201, await response.get_data(as_text=True)
    created: dict[str, Any] = await response.get_json()
    return created


async def test_fires_missed_while_no_scheduler_ran_are_coalesced_into_one_task_at_start_up(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    api = (await serving(ROLES=["api"])).test_client()
    latest = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    schedule = await make_schedule(api, auth_headers, cron=f"{latest.minute} {latest.hour} * * *")
    first_missed = latest - timedelta(days=3)  # missed: -3 d, -2 d, -1 d and `latest`
    await fetch(clean_database, "UPDATE schedules SET next_run_at = $1", first_missed)

    await serving(ROLES=["scheduler"])
    await eventually(lambda: count(clean_database, "SELECT count(*) FROM tasks"))
    await asyncio.sleep(1.5)  # a few more firing ticks: still one task
    [row] = await fetch(clean_database, "SELECT id FROM tasks")
    task = await (await api.get(f"/api/tasks/{row['id']}", headers=auth_headers)).get_json()
    assert task["schedule"] == {
        "id": schedule["id"],
        "fire_time": first_missed.isoformat().replace("+00:00", "Z"),
        "coalesced_fires": 3,
        "manual": False,
    }
    assert task["status"] == "available"
    after = await (await api.get(f"/api/schedules/{schedule['id']}", headers=auth_headers)).get_json()
    assert after["next_run_at"] == (latest + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    assert (after["last_task_id"], after["last_fire_time"]) == (task["id"], task["schedule"]["fire_time"])
    ledger = await fetch(clean_database, "SELECT fire_time, task_id, coalesced FROM schedule_fires")
    assert [(r["fire_time"], str(r["task_id"]), r["coalesced"]) for r in ledger] == [
        (first_missed, task["id"], 3)
    ]


async def test_racing_firers_make_one_task_per_fire_time(
    settings: Settings, serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    api = (await serving(ROLES=["api"])).test_client()
    steps = {f"every-second-{i}": 1 for i in range(5)} | {"every-2s": 2}
    for name, step in steps.items():
        await make_schedule(api, auth_headers, name=name, cron=f"*/{step} * * * * *")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    start -= timedelta(seconds=start.second % 2)  # a fire time of every schedule
    await fetch(clean_database, "UPDATE schedules SET next_run_at = $1", start)  # a backlog within the grace
    replicas = [Database(settings) for _ in range(4)]
    for replica in replicas:
        await replica.connect()

    async def keep_firing(replica: Database, until: float) -> int:
        made = 0
        while time.monotonic() < until:
            report = await schedules.fire_due(
                engine_over(replica), grace_s=60, batch=2
            )  # small batches: replicas interleave
            made += report.on_time
            await asyncio.sleep(0.005)
        return made

    try:  # four replicas firing as fast as they can, as a cluster would, for a few seconds
        until = time.monotonic() + 2.5
        async with asyncio.TaskGroup() as group:  # one failing cancels the others
            firing = [group.create_task(keep_firing(r, until)) for r in replicas]
        made = [task.result() for task in firing]
    finally:
        for replica in replicas:
            await replica.disconnect()
    assert sum(1 for n in made if n) >= 2  # the work really was shared
    rows = await fetch(
        clean_database,
        "SELECT s.name, s.next_run_at, (t.schedule->>'fire_time')::timestamptz AS fire_time, "
        "t.schedule->>'coalesced_fires' AS c "
        "FROM tasks t JOIN schedules s ON s.id = (t.schedule->>'id')::uuid ORDER BY 1, 3",
    )
    for name, step in steps.items():
        times = [r["fire_time"] for r in rows if r["name"] == name]
        assert len(times) == len(set(times)), f"duplicate fire times for {name}"
        assert times[0] == start
        assert all(b - a == timedelta(seconds=step) for a, b in itertools.pairwise(times)), times
        next_run_at = next(r["next_run_at"] for r in rows if r["name"] == name)
        assert next_run_at == times[-1] + timedelta(seconds=step)  # no gap up to the next fire
        assert len(times) >= 20 // step
    assert {r["c"] for r in rows} == {"0"}  # within the grace: nothing coalesced
    assert await count(clean_database, "SELECT count(*) FROM schedule_fires") == len(rows) == sum(made)


async def test_the_fire_ledger_refuses_a_second_task_for_a_fire_time(
    engine: TaskEngine, serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    api = (await serving(ROLES=["api"])).test_client()
    await make_schedule(api, auth_headers, cron="* * * * * *")
    due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=3)
    await fetch(clean_database, "UPDATE schedules SET next_run_at = $1", due)
    first = await schedules.fire_due(engine, grace_s=60)
    # 4 fire times (one more when a second began meanwhile, as under load)
    assert first.on_time >= 4, first
    assert first.duplicates == 0, first
    # as if a replica had read a stale next_run_at: the same fire times come due again
    await fetch(clean_database, "UPDATE schedules SET next_run_at = $1", due)
    again = await schedules.fire_due(engine, grace_s=60)
    assert again.duplicates >= first.on_time
    assert await count(clean_database, "SELECT count(*) FROM tasks") == first.on_time + again.on_time
    assert await count(clean_database, "SELECT count(DISTINCT schedule->>'fire_time') FROM tasks") == (
        await count(clean_database, "SELECT count(*) FROM tasks")
    )


async def test_a_skipped_job_is_healthy_only_while_the_replica_that_runs_it_succeeds(
    serving: Serving, clean_database: str
) -> None:
    # another replica holds the prune period (it started just now) and last succeeded a minute ago
    await fetch(
        clean_database,
        "INSERT INTO maintenance_jobs (name, last_started_at, last_succeeded_at, started_by) "
        "VALUES ('prune', now(), now() - interval '1 minute', 'elsewhere')",
    )
    healthy = (await serving(ROLES=["api", "scheduler"])).test_client()
    await eventually(lambda: _ready(healthy, True))
    # now that replica has been failing for a day: a replica that skips prune must not say ready
    await fetch(clean_database, "UPDATE maintenance_jobs SET last_succeeded_at = now() - interval '1 day'")
    stale = (await serving(ROLES=["api", "scheduler"])).test_client()
    body = await eventually(lambda: _ready(stale, False))
    assert body["checks"]["scheduler"] is False
    assert await count(clean_database, "SELECT runs FROM maintenance_jobs WHERE name = 'prune'") == 0


async def _ready(client: Any, expected: bool) -> Any:
    response = await client.get("/api/common/ready")
    body = await response.get_json()
    return body if (response.status_code == 200) is expected and body["ready"] is expected else None


def scheduler_with(db: Database, settings: Settings, jobs: list[Job], **kwargs: Any) -> Scheduler:
    scheduler = Scheduler(db, settings, **kwargs)
    scheduler.jobs = jobs
    return scheduler


async def test_shutdown_waits_for_a_job_in_flight_and_nothing_runs_after_it(
    db: Database, settings: Settings, clean_database: str
) -> None:
    started = asyncio.Event()
    events: list[str] = []
    ticks: list[float] = []

    async def slow() -> None:
        started.set()
        await asyncio.sleep(1)
        async with db.driver() as conn:  # the run still needs the database at its end
            await conn.fetchval("SELECT 1")
        events.append("finished")

    async def frequent() -> None:
        ticks.append(time.monotonic())

    scheduler = scheduler_with(
        db, settings, [Job("slow", 60, slow), Job("frequent", 0.05, frequent, cluster_wide=False)]
    )
    scheduler.start()
    await asyncio.wait_for(started.wait(), timeout=10)
    await scheduler.shutdown()
    assert events == ["finished"]
    [row] = await fetch(
        clean_database,
        "SELECT runs, lease_expires_at, last_succeeded_at FROM maintenance_jobs WHERE name = 'slow'",
    )
    assert (row["runs"], row["lease_expires_at"]) == (1, None)
    assert row["last_succeeded_at"] is not None
    seen = len(ticks)
    await asyncio.sleep(0.3)
    assert len(ticks) == seen  # no run after shutdown returned (the database closes next)
    assert not [t for t in asyncio.all_tasks() if t.get_name() in ("slow", "frequent")]


async def test_shutdown_cancels_a_job_that_outlasts_the_grace_and_frees_its_lease(
    db: Database, settings: Settings, clean_database: str
) -> None:
    started = asyncio.Event()
    events: list[str] = []

    async def stuck() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    scheduler = scheduler_with(db, settings, [Job("stuck", 60, stuck)], shutdown_grace_s=0.3)
    scheduler.start()
    await asyncio.wait_for(started.wait(), timeout=10)
    [held] = await fetch(clean_database, "SELECT lease_expires_at FROM maintenance_jobs WHERE name = 'stuck'")
    assert held["lease_expires_at"] is not None
    began = time.monotonic()
    await scheduler.shutdown()
    assert time.monotonic() - began < 3
    assert events == ["cancelled"]
    [row] = await fetch(
        clean_database, "SELECT runs, lease_expires_at FROM maintenance_jobs WHERE name = 'stuck'"
    )
    assert (row["runs"], row["lease_expires_at"]) == (0, None)


async def test_shutdown_returns_within_its_grace_even_when_a_job_ignores_its_cancel(
    db: Database, settings: Settings, clean_database: str
) -> None:
    """After cancelling what outlasted the grace, the stop waited up to 5 s more for it: a job that
    goes on after its cancel (a cleanup of its own, a shielded call) held the process's stop that
    long past WORKER_SHUTDOWN_GRACE_S. It is left behind now (its lease expires by itself)."""
    started = asyncio.Event()
    events: list[str] = []

    async def deaf() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(3)  # goes on regardless
            events.append("ended")

    scheduler = scheduler_with(db, settings, [Job("deaf", 60, deaf)], shutdown_grace_s=0.5)
    scheduler.start()
    await asyncio.wait_for(started.wait(), timeout=10)
    began = time.monotonic()
    await scheduler.shutdown()
    assert time.monotonic() - began < 0.5 + 0.3  # the grace (and a loop turn), not the grace + 3 s
    assert events == ["cancelled"]
    [left] = [t for t in asyncio.all_tasks() if t.get_name() == "deaf"]
    await asyncio.wait([left], timeout=5)  # let it end before the database closes under it
    assert events == ["cancelled", "ended"]


async def test_the_runtime_stop_is_bounded_by_the_grace_when_a_job_ignores_its_cancel(
    settings: Settings, clean_database: str, monkeypatch: Any
) -> None:
    """The process's stop (Runtime.stop, after the server's drain): a maintenance run that goes on
    after its cancel, holding a pooled connection, held it 4 s past a 1 s grace (the scheduler's
    wait after the cancel, then the pool's close waiting for that connection)."""
    from app import create_app
    from app.scheduler import Scheduler

    started = asyncio.Event()

    async def deaf(self: Scheduler) -> None:
        async with self.db.driver() as conn:
            await conn.fetchval("SELECT 1")
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(4)  # a cleanup that goes on regardless, connection held

    monkeypatch.setattr(Scheduler, "refresh_caches", deaf)  # a job that runs at once at start
    app = create_app(settings.model_copy(update={"ROLES": ["scheduler"], "WORKER_SHUTDOWN_GRACE_S": 1.0}))
    async with app.test_app():
        runtime = app.extensions["taskgate"]
        await asyncio.wait_for(started.wait(), timeout=10)
        began = time.monotonic()
        await runtime.stop()
        stopped_in = time.monotonic() - began
    assert stopped_in < 1.0 + 0.75, stopped_in  # the grace, plus the unwinding the README allows
    left = [t for t in asyncio.all_tasks() if t.get_name() == "refresh_caches"]
    await asyncio.wait(left, timeout=6)  # the deaf run, left behind, ends on its own


async def test_the_runtime_stop_is_bounded_by_the_grace_with_an_insert_batch_in_flight(
    settings: Settings, clean_database: str, auth_headers: dict[str, str]
) -> None:
    """The stop waited for the enqueue batch in flight, up to its deadline (a checkout and a
    statement: 4.5 s), past the grace. It waits what is left of the grace now. (Under `serve` the
    server's drain has already ended, unanswered, the requests still open at the grace's end; the
    batch's statement, already in PostgreSQL, runs to its end whether or not anyone waits.)"""
    from app import create_app

    await fetch(
        clean_database,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
    )
    await fetch(
        clean_database, "CREATE TRIGGER slow AFTER INSERT ON tasks FOR EACH STATEMENT EXECUTE FUNCTION slow()"
    )
    try:
        app = create_app(settings.model_copy(update={"ROLES": ["api"], "WORKER_SHUTDOWN_GRACE_S": 0.5}))
        async with app.test_app():
            client = app.test_client()
            runtime = app.extensions["taskgate"]
            enqueueing = asyncio.ensure_future(
                client.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
            )
            await eventually(lambda: _sleeping(clean_database), timeout=10)
            began = time.monotonic()
            await runtime.stop()
            stopped_in = time.monotonic() - began
            await asyncio.wait([enqueueing], timeout=10)
    finally:
        await eventually(lambda: _sleeping(clean_database, none=True), timeout=10)
        await fetch(clean_database, "DROP TRIGGER IF EXISTS slow ON tasks")
        await fetch(clean_database, "DROP FUNCTION IF EXISTS slow()")
    assert stopped_in < 0.5 + 0.75, stopped_in  # the grace and the pool's last moment, not the batch's 2 s


async def _sleeping(database_uri: str, *, none: bool = False) -> bool:
    rows = await fetch(
        database_uri,  # this database's: other tests sleep in theirs
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE wait_event = 'PgSleep' AND datname = current_database()",
    )
    return not rows[0]["n"] if none else bool(rows[0]["n"])


async def test_a_run_longer_than_its_period_is_never_doubled_by_another_replica(
    settings: Settings, clean_database: str
) -> None:
    runs: list[tuple[str, float, float]] = []

    def slow_job(replica: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            began = time.monotonic()
            await asyncio.sleep(0.7)  # over three periods
            runs.append((replica, began, time.monotonic()))

        return run

    databases = [Database(settings) for _ in range(2)]
    replicas = []
    for i, database in enumerate(databases):
        await database.connect()
        replicas.append(scheduler_with(database, settings, [Job("slow", 0.2, slow_job(f"r{i}"))]))
    try:
        for replica in replicas:
            replica.start()
        await asyncio.sleep(2.5)
    finally:
        for replica in replicas:
            await replica.shutdown()
        for database in databases:
            await database.disconnect()
    runs.sort(key=lambda run: run[1])
    assert len(runs) >= 2
    overlapping = [(a, b) for a, b in itertools.pairwise(runs) if b[1] < a[2]]
    assert not overlapping  # the lease holds the job until the run ends, whichever replica ran it


async def test_a_failing_job_is_recorded_and_turns_readiness_false(
    db: Database, settings: Settings, clean_database: str
) -> None:
    async def broken() -> None:
        raise RuntimeError("disk on fire")

    scheduler = scheduler_with(db, settings, [Job("broken", 60, broken)])
    scheduler.start()
    try:
        await eventually(lambda: _failures(clean_database))
        assert scheduler.healthy()  # one failure is not yet stale
        scheduler._last_success["broken"] -= 301  # as if it had been failing for five periods
        assert not scheduler.healthy()
    finally:
        await scheduler.shutdown()
    [row] = await fetch(
        clean_database, "SELECT runs, failures, last_error, lease_expires_at FROM maintenance_jobs"
    )
    assert (row["runs"], row["failures"], row["lease_expires_at"]) == (1, 1, None)
    assert "disk on fire" in row["last_error"]


async def _failures(database_uri: str) -> int:
    return await count(database_uri, "SELECT COALESCE(sum(failures), 0) FROM maintenance_jobs")


async def test_prune_removes_what_is_past_retention(
    db: Database, settings: Settings, serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    api = (await serving(ROLES=["api"])).test_client()
    schedule = await make_schedule(api, auth_headers, cron="@daily")
    for _ in range(2):
        response = await api.post(
            "/api/tasks",
            json={"kind": "noop"},
            headers={**auth_headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 201
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'completed', finished_at = now() - interval '8 days' "
        "WHERE id = (SELECT id FROM tasks ORDER BY id LIMIT 1)",
    )
    await fetch(
        clean_database,
        "UPDATE idempotency_keys SET created_at = now() - interval '2 days' "
        "WHERE task_ids[1] = (SELECT id FROM tasks ORDER BY id LIMIT 1)",
    )
    for age_days in (8, 1):
        await fetch(
            clean_database,
            "INSERT INTO schedule_fires (schedule_id, fire_time, task_id) "
            "VALUES ($1, now() - make_interval(days => $2), $3)",
            uuid.UUID(schedule["id"]),
            age_days,
            uuid.uuid4(),
        )
    # two deleted schedules kept for a delete sent again: one deleted two days ago
    for age in ("1 hour", "2 days"):
        await fetch(
            clean_database,
            "INSERT INTO deleted_schedules (id, client_id, schedule, deleted_at) "
            f"VALUES ($1, $2, '{{}}', now() - interval '{age}')",
            uuid.uuid4(),
            uuid.uuid4(),
        )
    # an operator with one live and one long-expired session
    from app.src.api.auth import operators

    operator = await operators.create_operator(db, email="prune@example.com", password="a long password here")
    for _ in range(2):
        await operators.start_session(db, user_id=operator.user_id)
    await fetch(
        clean_database,
        "UPDATE sessions SET expires_at = now() - interval '3 days' "
        "WHERE id = (SELECT id FROM sessions ORDER BY created_at LIMIT 1)",
    )
    # two worker processes seen: one a minute ago, one two days ago
    for name, age in (("fresh", "1 minute"), ("gone", "2 days")):
        await fetch(
            clean_database,
            "INSERT INTO workers (id, name, version, remote, kinds, running, last_seen_at) "
            f"VALUES ($1, $2, 'test', false, '{{}}', 0, now() - interval '{age}')",
            uuid.uuid4(),
            name,
        )
    pruned = await Scheduler(db, settings).prune()
    assert pruned is not None
    assert {k: v for k, v in pruned.items() if v} == {
        "tasks": 1, "idempotency_keys": 1, "deleted_schedules": 1, "schedule_fires": 1, "sessions": 1,
        "workers": 1,
    }  # fmt: skip
    assert await count(clean_database, "SELECT count(*) FROM deleted_schedules") == 1
    assert [r["name"] for r in await fetch(clean_database, "SELECT name FROM workers")] == ["fresh"]
    assert await count(clean_database, "SELECT count(*) FROM sessions") == 1
    assert await count(clean_database, "SELECT count(*) FROM tasks") == 1
    assert await count(clean_database, "SELECT count(*) FROM idempotency_keys") == 1
    assert await count(clean_database, "SELECT count(*) FROM schedule_fires") == 1


async def test_prune_runs_every_tenth_of_the_shortest_retention(db: Database, settings: Settings) -> None:
    def prune_period(**retention: float) -> float:
        scheduler = Scheduler(db, settings.model_copy(update=retention))
        return next(job.period_s for job in scheduler.jobs if job.name == "prune")

    # a week of tasks and a day of idempotency records: every five minutes, as before
    assert prune_period(TASK_RETENTION_DAYS=7, IDEMPOTENCY_RETENTION_HOURS=24) == 300
    # two hours of idempotency records: a tenth is 12 minutes, past the five-minute ceiling
    assert prune_period(TASK_RETENTION_DAYS=7, IDEMPOTENCY_RETENTION_HOURS=2) == 300
    # a retention of ten minutes is pruned every minute; a minute's every 10 s (the floor)
    assert prune_period(TASK_RETENTION_DAYS=600 / 86_400) == 60
    assert prune_period(TASK_RETENTION_DAYS=60 / 86_400) == 10


async def test_prune_keeps_the_finished_children_of_a_parent_as_long_as_the_parent(
    db: Database, settings: Settings, serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A parent that waits longer than the retention replays its spawns when it runs again, and so
    does a finished one retried by hand: its children must still be there, or they would be
    created and run a second time. They go with it."""
    api = (await serving(ROLES=["api"])).test_client()
    ids = []
    for _ in range(3):
        response = await api.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
        ids.append(uuid.UUID((await response.get_json())["id"]))
    waiting_parent, finished_parent, child_of_waiting = ids
    await fetch(clean_database, "UPDATE tasks SET status = 'waiting' WHERE id = $1", waiting_parent)
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'completed', finished_at = now() - interval '8 days' WHERE id = $1",
        finished_parent,
    )
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'completed', finished_at = now() - interval '8 days', parent_id = $2, "
        "child_key = 'a' WHERE id = $1",
        child_of_waiting,
        waiting_parent,
    )
    pruned = await Scheduler(db, settings).prune()
    assert pruned is not None
    assert pruned["tasks"] == 1  # the finished parent; not the child of the waiting one
    left = {r["id"] for r in await fetch(clean_database, "SELECT id FROM tasks")}
    assert left == {waiting_parent, child_of_waiting}
    # its parent finished (and may be retried by hand): the child stays while the parent does
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'discarded', finished_at = now() WHERE id = $1",
        waiting_parent,
    )
    assert await Scheduler(db, settings).prune() is None
    retried = await api.post(f"/api/tasks/{waiting_parent}/retry", headers=auth_headers)
    assert retried.status_code == 200, await retried.get_data(as_text=True)
    left = await fetch(clean_database, "SELECT id, status FROM tasks")
    assert {(r["id"], r["status"]) for r in left} == {
        (waiting_parent, "available"),
        (child_of_waiting, "completed"),
    }
    # once the parent is past its retention it goes, and the child at the next prune
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'completed', finished_at = now() - interval '8 days' WHERE id = $1",
        waiting_parent,
    )
    await Scheduler(db, settings).prune()
    assert {r["id"] for r in await fetch(clean_database, "SELECT id FROM tasks")} == {child_of_waiting}
    await Scheduler(db, settings).prune()
    assert await fetch(clean_database, "SELECT id FROM tasks") == []


async def test_a_task_retried_by_hand_while_the_prune_deletes_it_stays_with_its_attempts(
    db: Database, settings: Settings, serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A dead letter retried by hand at the moment the prune found it past its retention: the prune
    had read it as discarded, then waited for the retry's lock on its row. It must read it again
    then: the retried task is waiting to run (the retry answered 200), not past any retention."""
    from app.src.api.tasks import RETRYABLE_BY_CLIENT
    from app.src.database import tasks as task_store

    api = (await serving(ROLES=["api"])).test_client()
    response = await api.post("/api/tasks", json={"kind": "noop"}, headers=auth_headers)
    task_id = uuid.UUID((await response.get_json())["id"])
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'discarded', attempts = 1, finished_at = now() - interval '8 days' "
        "WHERE id = $1",
        task_id,
    )
    await fetch(
        clean_database,
        "INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, error, duration_ms) "
        "VALUES ($1, 1, now() - interval '8 days', now() - interval '8 days', 'failed', 'why it died', 5)",
        task_id,
    )
    [client_id] = [r["client_id"] for r in await fetch(clean_database, "SELECT client_id FROM tasks")]

    async def prune_waits_for_the_retry() -> bool:
        rows = await fetch(
            clean_database,
            "SELECT 1 FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE '%DELETE FROM tasks%'",
        )
        return bool(rows)

    async with db.driver() as conn, conn.transaction():
        retried = await task_store.retry(
            conn, client_id=client_id, task_id=task_id, from_statuses=RETRYABLE_BY_CLIENT
        )
        assert retried is not None
        assert retried.status == "available"
        pruning = asyncio.create_task(Scheduler(db, settings).prune())
        await eventually(prune_waits_for_the_retry)
    await asyncio.wait_for(pruning, timeout=10)
    shown = await api.get(f"/api/tasks/{task_id}", headers=auth_headers)
    assert shown.status_code == 200, await shown.get_data(as_text=True)
    assert (await shown.get_json())["status"] == "available"
    attempts = await api.get(f"/api/tasks/{task_id}/attempts", headers=auth_headers)
    assert [a["error"] for a in (await attempts.get_json())["items"]] == ["why it died"]


async def test_the_scheduler_says_at_start_whether_the_servers_autovacuum_suits_a_queue(
    db: Database, settings: Settings
) -> None:
    scheduler = Scheduler(db, settings)
    async with db.driver() as conn:
        enabled = await conn.fetchval("SHOW autovacuum")
        naptime = await conn.fetchval(
            "SELECT setting::int FROM pg_settings WHERE name = 'autovacuum_naptime'"
        )
    with structlog.testing.capture_logs() as logs:
        advice = await scheduler.check_autovacuum()
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    if enabled == "on" and naptime <= 20:
        assert advice is None
        assert warnings == []
    else:  # an external TEST_DB_URI server at PostgreSQL's defaults
        assert advice is not None
        assert [entry["advice"] for entry in warnings] == [advice]
    if not os.environ.get("TEST_DB_URI"):  # the embedded server runs with the round it recommends
        assert (enabled, naptime) == ("on", 10)


async def test_a_server_at_the_default_round_gets_a_warning_naming_the_setting(
    db: Database, settings: Settings, monkeypatch: Any
) -> None:
    async def default_round(conn: Any) -> tuple[bool, float]:
        return True, 60.0

    monkeypatch.setattr(maintenance, "autovacuum_settings", default_round)
    with structlog.testing.capture_logs() as logs:
        advice = await Scheduler(db, settings).check_autovacuum()
    assert advice is not None
    assert advice.startswith("autovacuum_naptime is 60 s")
    assert [entry["advice"] for entry in logs if entry["log_level"] == "warning"] == [advice]


async def test_an_autovacuum_check_that_cannot_run_does_not_hold_up_the_start(
    db: Database, settings: Settings, monkeypatch: Any
) -> None:
    async def stalled(conn: Any) -> tuple[bool, float]:
        await asyncio.sleep(60)  # a server that does not answer
        return True, 10.0

    monkeypatch.setattr(maintenance, "autovacuum_settings", stalled)
    started = time.monotonic()
    assert await Scheduler(db, settings).check_autovacuum(timeout_s=0.5) is None
    assert time.monotonic() - started < 5.0


def test_the_advice_names_the_setting_to_change() -> None:
    assert autovacuum_advice(True, 10.0) is None
    assert autovacuum_advice(True, 20.0) is None
    advice = autovacuum_advice(True, 60.0)
    assert advice is not None
    assert "autovacuum_naptime is 60 s" in advice
    assert "set it to 10s" in advice
    off = autovacuum_advice(False, 10.0)
    assert off is not None
    assert off.startswith("autovacuum is off")
