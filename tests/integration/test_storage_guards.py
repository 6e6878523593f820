"""Compare-and-set at the storage level: rescue and completion never overwrite what finished."""

import uuid
from datetime import UTC, datetime

import pytest

from app.database import Database
from app.src.api.engine.outcomes import rescue_expired_leases
from app.src.api.engine.submit import UnknownClient
from app.src.api.kinds import REGISTRY, load_kinds
from app.src.api.kinds.builtin import NoopPayload
from app.src.api.state_machine import Status
from app.src.database import http as http_store
from app.src.database import tasks as store
from app.src.database.tasks import Completion
from tests.conftest import make_client

load_kinds()


async def make_task(db: Database) -> uuid.UUID:
    noop = REGISTRY.get("noop")
    assert noop is not None
    owner = await make_client(db, "owner")
    async with db.transaction() as conn:
        task = await noop.enqueue(NoopPayload(), db=conn, client_id=owner.client_id)
    return task.id


async def claim_one(db: Database, worker: uuid.UUID) -> store.ClaimedTask:
    async with db.driver() as conn:
        [claimed] = await store.claim_available(conn, limit=1, lease_s=30, worker_id=worker, queues=None)
    return claimed


def completed(claimed: store.ClaimedTask) -> Completion:
    now = datetime.now(UTC)
    return Completion(
        id=claimed.id, attempt=claimed.attempt, status=Status.COMPLETED, outcome="completed",
        started_at=claimed.started_at, finished_at=now, result={"ok": True},
    )  # fmt: skip


async def test_rescue_never_touches_a_task_that_finished(db: Database) -> None:
    task_id = await make_task(db)
    worker = uuid.uuid4()
    claimed = await claim_one(db, worker)
    async with db.driver() as conn:
        assert len(await store.complete(conn, [completed(claimed)], worker_id=worker)) == 1
        # even with a lease that looks expired, a completed task is not the rescuer's business
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 hour' WHERE id = $1", task_id
        )
        assert await rescue_expired_leases(conn) == []
        row = await conn.fetchrow("SELECT status, result FROM tasks WHERE id = $1", task_id)
    assert row["status"] == "completed"
    assert row["result"] == {"ok": True}


async def test_a_completion_after_the_lease_was_rescued_is_dropped(db: Database) -> None:
    task_id = await make_task(db)
    slow_worker = uuid.uuid4()
    claimed = await claim_one(db, slow_worker)
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
        )
        rescued = await rescue_expired_leases(conn)
        assert [(r["id"], r["status"]) for r in rescued] == [(task_id, "retryable")]
        # the slow worker wakes up and reports success for an attempt it no longer owns
        assert await store.complete(conn, [completed(claimed)], worker_id=slow_worker) == []
        # and its heartbeat no longer extends anything
        assert await store.heartbeat(conn, task_ids=[task_id], lease_s=30, worker_id=slow_worker) == {}
        row = await conn.fetchrow("SELECT status, attempts FROM tasks WHERE id = $1", task_id)
        outcomes = [
            r["outcome"]
            for r in await conn.fetch("SELECT outcome FROM task_attempts WHERE task_id = $1", task_id)
        ]
    assert (row["status"], row["attempts"]) == ("retryable", 1)
    assert outcomes == ["lost"]


async def test_a_second_claim_after_rescue_owns_the_task(db: Database) -> None:
    task_id = await make_task(db)
    first, second = uuid.uuid4(), uuid.uuid4()
    stale = await claim_one(db, first)
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
        )
        await rescue_expired_leases(conn)
        await conn.execute("UPDATE tasks SET run_at = now() WHERE id = $1", task_id)
        assert await store.stage_due(conn) == 1
    fresh = await claim_one(db, second)
    assert fresh.attempt == 2
    async with db.driver() as conn:
        assert await store.complete(conn, [completed(stale)], worker_id=first) == []
        assert len(await store.complete(conn, [completed(fresh)], worker_id=second)) == 1


async def test_a_released_runs_progress_never_lands_on_the_next_run_of_its_task(db: Database) -> None:
    """A released attempt is given back, so the next run of the task (another worker's) carries the
    same attempt number: guarded by status and attempt only, the first run's late progress report
    (its handler still going after the release) was written over the new run's."""
    task_id = await make_task(db)
    first, second = uuid.uuid4(), uuid.uuid4()
    claimed = await claim_one(db, first)
    async with db.driver() as conn:
        assert await store.release(conn, [claimed], worker_id=first) == [task_id]
    again = await claim_one(db, second)
    assert again.attempt == claimed.attempt
    async with db.driver() as conn:
        await store.set_progress(
            conn, task_id=task_id, attempt=again.attempt, worker_id=second, progress={"at": 1}
        )
        await store.set_progress(
            conn, task_id=task_id, attempt=claimed.attempt, worker_id=first, progress={"at": 99}
        )
        await store.set_progress_many(conn, [(task_id, claimed.attempt, first, {"at": 98})])
        assert await conn.fetchval("SELECT progress FROM tasks WHERE id = $1", task_id) == {"at": 1}
        await store.set_progress_many(conn, [(task_id, again.attempt, second, {"at": 2})])
        assert await conn.fetchval("SELECT progress FROM tasks WHERE id = $1", task_id) == {"at": 2}


async def test_enqueue_from_python_commits_with_the_callers_transaction(db: Database) -> None:
    noop = REGISTRY.get("noop")
    assert noop is not None
    owner = await make_client(db, "owner")

    class Rollback(Exception):
        pass

    try:
        async with db.transaction() as conn:
            await noop.enqueue(NoopPayload(), db=conn, client_id=owner.client_id)
            raise Rollback
    except Rollback:
        pass
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
    async with db.transaction() as conn:
        task = await noop.enqueue(NoopPayload(), db=conn, client_id=owner.client_id, queue="internal")
    async with db.driver() as conn:
        row = await conn.fetchrow("SELECT queue, client_id FROM tasks WHERE id = $1", task.id)
    assert (row["queue"], row["client_id"]) == ("internal", owner.client_id)


async def test_enqueue_from_python_for_an_unknown_client_is_refused(db: Database) -> None:
    noop = REGISTRY.get("noop")
    assert noop is not None
    with pytest.raises(UnknownClient):
        async with db.transaction() as conn:
            await noop.enqueue(NoopPayload(), db=conn, client_id=uuid.uuid4())
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
        assert await conn.fetchval("SELECT count(*) FROM queues") == 0


async def test_a_retried_task_never_reuses_an_attempt_number_so_a_stale_report_is_refused(
    db: Database,
) -> None:
    """A worker loses its lease (the task is discarded), the task is retried by hand and claimed
    again by the same worker: the report of the lost run must not be taken for the new run."""
    task_id = await make_task(db)
    worker = uuid.uuid4()
    async with db.driver() as conn:
        await conn.execute("UPDATE tasks SET max_attempts = 2 WHERE id = $1", task_id)
        client_id = await conn.fetchval("SELECT client_id FROM tasks WHERE id = $1", task_id)
    lost_run = None
    for attempt in (1, 2):  # both attempts of its budget lost: the task is dead-lettered
        lost_run = await claim_one(db, worker)
        assert lost_run.attempt == attempt
        async with db.driver() as conn:
            await conn.execute(
                "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
            )
            await rescue_expired_leases(conn)
            await conn.execute("UPDATE tasks SET run_at = now() WHERE id = $1", task_id)  # no backoff
            await store.stage_due(conn)
    assert lost_run is not None
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT status FROM tasks WHERE id = $1", task_id) == "discarded"
        retried = await store.retry(conn, client_id=client_id, task_id=task_id, from_statuses=["discarded"])
    assert retried is not None
    assert (retried.status, retried.attempts, retried.max_attempts) == ("available", 2, 4)  # 2 more

    new_run = await claim_one(db, worker)
    assert new_run.attempt == 3
    async with db.driver() as conn:
        assert await store.complete(conn, [completed(lost_run)], worker_id=worker) == []
        assert len(await store.complete(conn, [completed(new_run)], worker_id=worker)) == 1
        row = await conn.fetchrow("SELECT status, attempts, max_attempts FROM tasks WHERE id = $1", task_id)
        numbers = [
            r["attempt"]
            for r in await conn.fetch("SELECT attempt FROM task_attempts WHERE task_id = $1", task_id)
        ]
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("completed", 3, 4)
    assert numbers == [1, 2, 3]  # one record per attempt number

    # the budget stays what the task was created with, retry after retry
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE tasks SET status = 'discarded', finished_at = now() WHERE id = $1", task_id
        )
        again = await store.retry(conn, client_id=client_id, task_id=task_id, from_statuses=["discarded"])
    assert again is not None
    assert (again.attempts, again.max_attempts) == (3, 5)


async def test_a_task_whose_cancel_was_requested_while_it_ran_is_never_run_again(db: Database) -> None:
    """Its attempt ends in a failure to retry, or its worker dies: either way it ends cancelled."""
    failing, dying = await make_task(db), await make_task(db)
    worker = uuid.uuid4()
    async with db.driver() as conn:
        claimed = {
            c.id: c
            for c in await store.claim_available(conn, limit=2, lease_s=30, worker_id=worker, queues=None)
        }
        for task_id in (failing, dying):
            owner = await conn.fetchval("SELECT client_id FROM tasks WHERE id = $1", task_id)
            requested = await store.cancel(conn, client_id=owner, task_id=task_id)
            assert requested is not None
            assert (requested.status, requested.cancel_requested) == (
                "running",
                True,
            )
        run = claimed[failing]
        failed = Completion(
            id=run.id, attempt=run.attempt, status=Status.RETRYABLE, outcome="failed",
            started_at=run.started_at, finished_at=datetime.now(UTC), error="boom", retry_in_s=0.1,
        )  # fmt: skip
        [written] = await store.complete(conn, [failed], worker_id=worker)
        assert written["status"] == "cancelled"
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", dying
        )
        [rescued] = await rescue_expired_leases(conn)
        assert (rescued["id"], rescued["status"]) == (dying, "cancelled")
        rows = {
            r["id"]: (r["status"], r["finished_at"] is not None)
            for r in await conn.fetch("SELECT id, status, finished_at FROM tasks")
        }
        outcomes = {
            r["task_id"]: r["outcome"] for r in await conn.fetch("SELECT task_id, outcome FROM task_attempts")
        }
        assert await store.claim_available(conn, limit=2, lease_s=30, worker_id=worker, queues=None) == []
    assert rows == {failing: ("cancelled", True), dying: ("cancelled", True)}
    assert outcomes == {failing: "failed", dying: "lost"}  # each attempt keeps its own outcome


async def test_staging_wakes_thousands_of_queues_at_once(db: Database) -> None:
    """One NOTIFY naming every queue of a staging round passed PostgreSQL's 8000 bytes once the
    due tasks spanned about 1,300 queues: the statement failed, the next round picked the same
    rows, and no scheduled or retryable task anywhere became available again."""
    owner = await make_client(db, "many-queues")
    async with db.driver() as conn:
        await conn.execute(
            "INSERT INTO queues (client_id, name) SELECT $1, 'q' || i FROM generate_series(1, 2000) i",
            owner.client_id,
        )
        await conn.execute(
            """
            INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts, run_at)
            SELECT gen_random_uuid(), $1, q.id, q.name, 'noop', '{}', 'scheduled', 3, now() - interval '1 s'
            FROM queues q WHERE q.client_id = $1 AND q.name LIKE 'q%'
            """,
            owner.client_id,
        )
        assert await store.stage_due(conn) == 2000
        assert await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'available'") == 2000


async def test_a_task_past_its_1024th_attempt_is_retried_and_holds_up_no_other_rescue(db: Database) -> None:
    """Retries by hand add attempts (max_attempts moves on by the task's budget, up to 1000 each
    time), so a task can reach its 1025th attempt. Its backoff, 2**1024 times the minimum, did not
    fit a float: the rescuer's whole batch failed on it, at every round, and no expired lease in
    the cluster was rescued again."""
    veteran, other = await make_task(db), await make_task(db)
    worker = uuid.uuid4()
    async with db.driver() as conn:
        client_id = await conn.fetchval("SELECT client_id FROM tasks WHERE id = $1", veteran)
        # 1024 attempts used (a budget of 1000, then one retry by hand), all failed: a dead letter
        await conn.execute(
            "UPDATE tasks SET status = 'discarded', finished_at = now(), attempts = 1024, "
            "max_attempts = 1024, attempts_before_retry = 24 WHERE id = $1",
            veteran,
        )
        retried = await store.retry(conn, client_id=client_id, task_id=veteran, from_statuses=["discarded"])
        assert retried is not None
        assert (retried.attempts, retried.max_attempts) == (1024, 2024)
        claimed = await store.claim_available(conn, limit=2, lease_s=30, worker_id=worker, queues=None)
        assert {c.id: c.attempt for c in claimed} == {veteran: 1025, other: 1}
        await conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        rescued = await rescue_expired_leases(conn)
        # the backoff from the rescue's own now(): the time its lost attempt is recorded as ending
        rows = {
            r["id"]: (r["status"], r["run_at"] - r["finished_at"])
            for r in await conn.fetch(
                "SELECT t.id, t.status, t.run_at, a.finished_at FROM tasks t "
                "JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempts"
            )
        }
        queue = await conn.fetchrow("SELECT min_backoff_s, max_backoff_s FROM queues")
    assert {r["id"]: r["status"] for r in rescued} == {veteran: "retryable", other: "retryable"}
    status, delay = rows[veteran]
    assert status == "retryable"
    assert queue["min_backoff_s"] <= delay.total_seconds() <= queue["max_backoff_s"]  # the queue's bounds


async def test_a_lost_attempt_after_suspensions_backs_off_as_a_first_failure(db: Database) -> None:
    """The rescuer's backoff counts the failures of the task's life, as the worker's does: an
    attempt number moved on by suspensions or a retry by hand is no failure."""
    task_id = await make_task(db)
    worker = uuid.uuid4()
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE queues SET min_backoff_s = 0.5, max_backoff_s = 3600 "
            "WHERE id = (SELECT queue_id FROM tasks WHERE id = $1)",
            task_id,
        )
        # as after 20 suspensions
        await conn.execute(
            "UPDATE tasks SET attempts = 20, max_attempts = 23, attempts_before_retry = 20 WHERE id = $1",
            task_id,
        )
    claimed = await claim_one(db, worker)
    assert claimed.attempt == 21
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
        )
        [rescued] = await rescue_expired_leases(conn)
        backoff = await conn.fetchval(
            "SELECT EXTRACT(epoch FROM run_at - now())::float8 FROM tasks WHERE id = $1", task_id
        )
    assert rescued["status"] == "retryable"
    assert backoff < 1.0  # min_backoff 0.5 s: the first failure of this life


async def test_rescuing_one_lease_frees_only_that_tasks_host_permits(db: Database) -> None:
    # one worker, two http requests to one host, each holding a permit; only the first task's
    # lease expired: the rescue frees its permit, not the one of the request whose lease is valid
    first, second = await make_task(db), await make_task(db)
    worker = uuid.uuid4()
    async with db.driver() as conn:
        claimed = await store.claim_available(conn, limit=2, lease_s=30, worker_id=worker, queues=None)
        assert {c.id for c in claimed} == {first, second}
        slots = {}
        for task_id in (first, second):
            admission = await http_store.acquire_permit(
                conn, host="rescued.example:443", process_id=worker, task_id=task_id, limit=2,
                circuit_failures=5, lease_s=60,
            )  # fmt: skip
            assert admission.slot is not None
            slots[task_id] = admission.slot
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", first
        )
        rescued = await rescue_expired_leases(conn)
        assert [r["id"] for r in rescued] == [first]
        held = await conn.fetch(
            "SELECT slot FROM http_host_permits WHERE host = 'rescued.example:443' AND expires_at > now()"
        )
    assert [r["slot"] for r in held] == [slots[second]]


async def test_a_late_hand_back_never_releases_a_later_run_of_its_task(db: Database) -> None:
    """A hand-back that comes after its lease expired (a remote claim's answer abandoned at its
    lease): the rescuer retried the task and the same worker claimed it again. Guarded by status
    and worker only, the late hand-back released that later run while it ran, and another worker
    could run the task beside it."""
    task_id = await make_task(db)
    worker, other = uuid.uuid4(), uuid.uuid4()
    first = await claim_one(db, worker)
    async with db.driver() as conn:
        await conn.execute(
            "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task_id
        )
        assert [r["id"] for r in await rescue_expired_leases(conn)] == [task_id]
        await conn.execute("UPDATE tasks SET run_at = now(), status = 'available' WHERE id = $1", task_id)
    second = await claim_one(db, worker)
    assert second.attempt == first.attempt + 1
    async with db.driver() as conn:
        assert await store.release(conn, [first], worker_id=worker) == []
        assert await store.claim_available(conn, limit=1, lease_s=30, worker_id=other, queues=None) == []
        row = await conn.fetchrow("SELECT status, attempts, worker_id FROM tasks WHERE id = $1", task_id)
    assert (row["status"], row["attempts"], row["worker_id"]) == ("running", second.attempt, worker)
