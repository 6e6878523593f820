"""APScheduler 3 in the serving process: the maintenance jobs and the firing of user schedules.

Cluster-wide jobs run once per period across all replicas: every replica ticks on the same
period boundaries (interval triggers aligned to the epoch), and at each boundary the conditional
upsert on the job's `maintenance_jobs` row elects one of them, which holds a lease on the job
until its run ends. A replica that dies is replaced at the next boundary, within one period.

Firing user schedules is not elected: every replica ticks every second, and row locks (FOR
UPDATE SKIP LOCKED), the (schedule, fire time) key and a compare-and-set on next_run_at make each
fire time create exactly one task whichever replica gets there (app/src/api/schedules.py). An
election would add nothing to that guarantee; without one, fires lose no time when a replica dies.

Every run is logged and counted (runs, duration, last success). Readiness turns false when a job
has not succeeded for several periods anywhere in the cluster: for cluster-wide jobs the replica
reads the success time the elected replica wrote, so "another replica holds the period" is
healthy only while that replica is succeeding.

APScheduler only ticks: each tick starts the run as a task this class owns and returns, so
shutdown (which would cancel APScheduler's own coroutines mid-statement) instead stops ticking,
waits for runs in flight, cancels what outlasts the grace, and returns before the database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from app.src.api import schedules
from app.src.api.auth import operators
from app.src.api.engine import outcomes
from app.src.api.engine.task_engine import SubmitRules, TaskEngine
from app.src.api.http import RESOURCE_KEY as HTTP
from app.src.api.http.poller import StatusPoller
from app.src.api.kinds import REGISTRY
from app.src.database import durable as durable_store
from app.src.database import maintenance
from app.src.database import workers as worker_store
from app.src.utils.metrics import (
    SCHEDULER_DURATION,
    SCHEDULER_LAST_SUCCESS,
    SCHEDULER_RUNS,
    clear_queue_gauges,
    export_queue_gauges,
)

if TYPE_CHECKING:
    from app.database import Database
    from app.settings import Settings

WORKER_RETENTION_S = 86_400  # a worker (process) not seen for this long leaves the workers table

log = structlog.get_logger("taskgate.scheduler")

STALE_PERIODS = 5  # readiness fails after this many periods without a success anywhere
MIN_STALE_S = 30.0
ELECTION_SLACK = 0.8  # a new period may start 20% early: absorbs tick jitter between replicas
FIRE_INTERVAL_S = 1.0
# Composed waits resume by the event that ends them (a signal, the last child, the last dependency,
# in its own transaction); this sweep only ends signal waits at their timeout and catches anything
# missed.
COMPOSED_SWEEP_S = 1.0
CACHE_REFRESH_S = 5.0
# Pruning runs every tenth of the shortest retention, between these bounds: what is past
# retention lingers at most a tenth longer, so a table under steady load stays within about 1.1x
# of what its retention holds (a short retention, such as a soak test's, prunes often).
PRUNE_INTERVAL_S = 300.0
MIN_PRUNE_INTERVAL_S = 10.0
# A run in flight at shutdown gets this long to finish, then is cancelled: every job is safe to
# cancel (each statement or transaction is atomic), and the worker drains after the scheduler.
SHUTDOWN_GRACE_S = 5.0
# ... of which the end is for cancelled runs to unwind: at most UNWIND_S, and at most this share
UNWIND_S = 1.0
UNWIND_SHARE = 0.5
FIRE_BATCHES_PER_TICK = 10
# Autovacuum's round on the server. Every task's row is written three times and deleted by
# retention; between two rounds the dead versions and their index entries pile up. At
# PostgreSQL's default of 60 s a queue at 2,000 tasks/s held 2.3x the pages it does at 10 s
# (python -m bench.soak; README, "Benchmarks").
RECOMMENDED_NAPTIME_S = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def autovacuum_advice(enabled: bool, naptime_s: float) -> str | None:
    """What to tell the operator about the server's autovacuum, or None when it suits a queue."""
    if not enabled:
        return "autovacuum is off: dead task rows are never reclaimed and the task tables grow without bound"
    if naptime_s > 2 * RECOMMENDED_NAPTIME_S:
        return (
            f"autovacuum_naptime is {naptime_s:g} s: busy task tables bloat between vacuums; "
            f"set it to {RECOMMENDED_NAPTIME_S:g}s (docs/operations.md, Autovacuum and bloat)"
        )
    return None


def prune_interval_s(*retentions_s: float) -> float:
    """How often the prune job runs: a tenth of the shortest retention, within its bounds."""
    return min(PRUNE_INTERVAL_S, max(MIN_PRUNE_INTERVAL_S, min(retentions_s) / 10))


@dataclass(frozen=True)
class Job:
    name: str
    period_s: float
    run: Callable[[], Awaitable[Any]]
    cluster_wide: bool = True  # False: every replica runs it (its own caches, or its own guards)
    # a cluster-wide job whose period another replica holds: e.g. drop the gauges it exported
    on_skipped: Callable[[], None] | None = None

    @property
    def lease_s(self) -> float:
        """How long a run may go without renewing its lease before another replica may start."""
        return max(2 * self.period_s, 10.0)

    @property
    def stale_after_s(self) -> float:
        return max(self.period_s * STALE_PERIODS, MIN_STALE_S)


class Scheduler:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        resources: Mapping[str, Any] | None = None,
        engine: TaskEngine | None = None,
    ) -> None:
        self.db = db
        # the runtime's engine; a scheduler made alone (tests) gets one over its own database
        self.engine = engine or TaskEngine(db, SubmitRules.from_settings(settings, kinds=REGISTRY))
        self.settings = settings
        self.shutdown_grace_s = shutdown_grace_s
        self.resources: Mapping[str, Any] = resources or {}  # e.g. "http": the OutboundHttp
        self.replica = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._scheduler: AsyncIOScheduler | None = None
        self._stopping = False
        self._last_success: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # its polls outlive the runs that start them: a slow status URL holds up no other task
        self.poller = StatusPoller(db, self.engine.queues)
        self.jobs = [
            Job("rescue_expired_leases", settings.RESCUE_INTERVAL_S, self.rescue_expired_leases),
            Job(
                "poll_waiting_http",
                settings.HTTP_POLL_INTERVAL_S,
                lambda: self.poller.run(self.resources.get(HTTP)),
            ),
            Job("sweep_composed_waits", COMPOSED_SWEEP_S, self.sweep_composed_waits),
            Job("fire_schedules", FIRE_INTERVAL_S, self.fire_schedules, cluster_wide=False),
            Job("refresh_caches", CACHE_REFRESH_S, self.refresh_caches, cluster_wide=False),
            # elected like the other cluster-wide jobs: the queue gauges come from one replica at
            # a time, so sum() over a deployment's scrapes is not multiplied by its replicas
            Job("queue_metrics", CACHE_REFRESH_S, self.queue_metrics, on_skipped=clear_queue_gauges),
            Job("http_host_health", CACHE_REFRESH_S, self.http_host_health, cluster_wide=False),
            Job(
                "prune",
                prune_interval_s(
                    settings.TASK_RETENTION_DAYS * 86_400, settings.IDEMPOTENCY_RETENTION_HOURS * 3600
                ),
                self.prune,
            ),
        ]

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start ticking (needs the running loop); every job also runs once right away."""
        scheduler = AsyncIOScheduler(timezone="UTC")
        now = datetime.now(UTC)
        for job in self.jobs:
            # cluster-wide jobs tick on shared boundaries, so a period's election is decided at once
            trigger = IntervalTrigger(seconds=job.period_s, start_date=_EPOCH if job.cluster_wide else now)
            scheduler.add_job(
                self._tick,
                trigger,
                args=[job],
                id=job.name,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
                next_run_time=now,
            )
            self._last_success[job.name] = time.monotonic()
        scheduler.start()
        self._scheduler = scheduler
        log.info("scheduler started", jobs=[job.name for job in self.jobs], replica=self.replica)

    async def shutdown(self) -> None:
        """Stop ticking, let runs in flight finish, cancel what outlasts them; returns within
        `shutdown_grace_s` whatever a job does.

        The grace's last share (UNWIND_SHARE, at most UNWIND_S) is for cancelled runs to unwind
        (free their leases). A run still going after that is left behind, logged: waiting for it
        held the process's stop up to 5 s past WORKER_SHUTDOWN_GRACE_S. Its lease expires by itself,
        and every job is safe to cut anywhere (each statement or transaction is atomic)."""
        loop = asyncio.get_running_loop()
        grace = max(0.0, self.shutdown_grace_s)
        deadline = loop.time() + grace
        self._stopping = True
        self.poller.stop_claiming()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None
        in_flight: list[asyncio.Task[Any]] = [task for task in self._in_flight.values() if not task.done()]
        in_flight += self.poller.in_flight()  # cancelled, a poll hands its task back at once
        if in_flight:
            log.info("waiting for maintenance jobs", jobs=sorted(t.get_name() for t in in_flight))
            unwind_s = min(UNWIND_S, grace * UNWIND_SHARE)
            _, late = await asyncio.wait(in_flight, timeout=max(0.0, deadline - unwind_s - loop.time()))
            late |= set(self.poller.in_flight())  # started by a claim that was in flight
            for task in late:
                task.cancel()
            if late:
                _, stuck = await asyncio.wait(late, timeout=max(0.0, deadline - loop.time()))
                if stuck:
                    log.warning("maintenance jobs did not stop when cancelled; left behind",
                                jobs=sorted(t.get_name() for t in stuck))  # fmt: skip
        self._in_flight.clear()
        log.info("scheduler stopped", replica=self.replica)

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def healthy(self) -> bool:
        now = time.monotonic()
        return self.running and all(
            now - self._last_success.get(job.name, now) <= job.stale_after_s for job in self.jobs
        )

    async def _tick(self, job: Job) -> None:
        """APScheduler's entry: start a run unless stopping or the previous run is still going."""
        if self._stopping:
            return
        previous = self._in_flight.get(job.name)
        if previous is not None and not previous.done():
            log.debug("maintenance job still running; tick skipped", job=job.name)
            return
        self._in_flight[job.name] = asyncio.create_task(self._run(job), name=job.name)

    async def _run(self, job: Job) -> None:
        started = time.perf_counter()
        run_id = uuid.uuid4()
        elected = False
        try:
            if job.cluster_wide:
                if not await self._elect(job, run_id):
                    if job.on_skipped is not None:
                        job.on_skipped()
                    return
                elected = True
            outcome = await self._holding_lease(job, run_id) if elected else await job.run()
            if elected:
                async with self.db.driver() as conn:
                    await maintenance.finished(conn, job=job.name, run_id=run_id, error=None)
        except asyncio.CancelledError:
            SCHEDULER_RUNS.labels(job.name, "cancelled").inc()
            log.warning("maintenance job cancelled at shutdown", job=job.name)
            if elected:
                await self._release(job, run_id)
            raise
        except Exception as exc:
            SCHEDULER_RUNS.labels(job.name, "failure").inc()
            SCHEDULER_DURATION.labels(job.name).observe(time.perf_counter() - started)
            log.exception("maintenance job failed", job=job.name)
            if elected:
                with contextlib.suppress(Exception):
                    async with self.db.driver() as conn:
                        await maintenance.finished(conn, job=job.name, run_id=run_id, error=repr(exc)[:500])
            return
        elapsed = time.perf_counter() - started
        SCHEDULER_RUNS.labels(job.name, "success").inc()
        SCHEDULER_DURATION.labels(job.name).observe(elapsed)
        SCHEDULER_LAST_SUCCESS.labels(job.name).set_to_current_time()
        self._last_success[job.name] = time.monotonic()
        if outcome:
            log.info(
                "maintenance job ran", job=job.name, result=outcome, duration_ms=round(elapsed * 1000, 1)
            )
        else:
            log.debug("maintenance job ran", job=job.name, duration_ms=round(elapsed * 1000, 1))

    async def _elect(self, job: Job, run_id: uuid.UUID) -> bool:
        """Whether this replica runs the job this period; a skip records the cluster's success time."""
        async with self.db.driver() as conn:
            election = await maintenance.elect(
                conn,
                job=job.name,
                min_interval_s=job.period_s * ELECTION_SLACK,
                lease_s=job.lease_s,
                replica=self.replica,
                run_id=run_id,
            )
        if not election.elected:
            SCHEDULER_RUNS.labels(job.name, "skipped").inc()
            if election.succeeded_age_s is not None:
                self._last_success[job.name] = time.monotonic() - election.succeeded_age_s
        return election.elected

    async def _holding_lease(self, job: Job, run_id: uuid.UUID) -> Any:
        """Run the job while renewing its lease; the renewer has stopped when this returns."""
        keeper = asyncio.create_task(self._keep_lease(job, run_id))
        try:
            return await job.run()
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])  # no renewal may land after the lease is freed

    async def _keep_lease(self, job: Job, run_id: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(job.lease_s / 3)
            try:
                async with self.db.driver() as conn:
                    await maintenance.renew_lease(conn, job=job.name, run_id=run_id, lease_s=job.lease_s)
            except Exception:
                log.warning("could not renew a maintenance lease", job=job.name, exc_info=True)

    async def _release(self, job: Job, run_id: uuid.UUID) -> None:
        try:
            async with asyncio.timeout(2), self.db.driver() as conn:
                await maintenance.release_lease(conn, job=job.name, run_id=run_id)
        except Exception:
            log.warning("could not release a maintenance lease; it expires by itself", job=job.name)

    # --- jobs ------------------------------------------------------------------------------------

    async def rescue_expired_leases(self) -> dict[str, int] | None:
        async with self.db.driver() as conn:
            rescued = await outcomes.rescue_expired_leases(conn)
        if not rescued:
            return None
        by_status: dict[str, int] = {}
        for row in rescued:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        return by_status

    async def sweep_composed_waits(self) -> dict[str, int] | None:
        async with self.db.driver() as conn:
            woken = await durable_store.sweep_waiting(conn)
        return {"woken": woken} if woken else None

    async def fire_schedules(self) -> dict[str, Any] | None:
        total = schedules.FireReport()
        for _ in range(FIRE_BATCHES_PER_TICK):
            report = await schedules.fire_due(self.engine, grace_s=self.settings.SCHEDULE_MISFIRE_GRACE_S)
            total.merge(report)
            if report.schedules < schedules.FIRE_BATCH:
                break
        return total.summary()

    async def check_autovacuum(self, *, timeout_s: float = 2.0) -> str | None:
        """Warn once, at start, when the server's autovacuum does not suit a queue's tables; a
        check that cannot run (a slow or restricted server) never holds up the start."""
        try:
            async with asyncio.timeout(timeout_s), self.db.driver() as conn:
                advice = autovacuum_advice(*await maintenance.autovacuum_settings(conn))
        except Exception as error:  # advice only: the start goes on without it
            log.info("autovacuum settings not read", error=repr(error))
            return None
        if advice is not None:
            log.warning("postgresql settings", advice=advice)
        return advice

    async def refresh_caches(self) -> None:
        self.engine.queues.clear()

    async def queue_metrics(self) -> None:
        """Depth per queue and unfinished status (zeros included) and the oldest available task's
        age, for every queue; beyond METRICS_MAX_QUEUES the smallest are summed as `_other`."""
        async with self.db.driver() as conn:
            rows = await maintenance.queue_depths(conn)
        export_queue_gauges(rows, max_queues=self.settings.METRICS_MAX_QUEUES)

    async def http_host_health(self) -> None:
        """Every replica's unhealthy-host gauge, from the circuit state in PostgreSQL."""
        http = self.resources.get(HTTP)
        if http is not None:
            await http.gate.refresh_health()

    async def prune(self) -> dict[str, int] | None:
        async with self.db.driver() as conn:
            tasks = await maintenance.prune_tasks(
                conn, older_than_s=self.settings.TASK_RETENTION_DAYS * 86_400
            )
            keys = await maintenance.prune_idempotency_keys(
                conn, older_than_s=self.settings.IDEMPOTENCY_RETENTION_HOURS * 3600
            )
            deleted_schedules = await maintenance.prune_deleted_schedules(
                conn, older_than_s=self.settings.IDEMPOTENCY_RETENTION_HOURS * 3600
            )
            fires = await maintenance.prune_schedule_fires(
                conn, older_than_s=self.settings.TASK_RETENTION_DAYS * 86_400
            )
            flow = await maintenance.prune_flow_state(
                conn, older_than_s=self.settings.TASK_RETENTION_DAYS * 86_400
            )
            # GET /api/workers shows the last ten minutes; a day keeps a restarted fleet's history
            workers = await worker_store.prune_workers(conn, older_than_s=WORKER_RETENTION_S)
        pruned = {
            "tasks": tasks, "idempotency_keys": keys, "deleted_schedules": deleted_schedules,
            "schedule_fires": fires, "flow_state": flow, "workers": workers,
        }  # fmt: skip
        # expired operator sessions, MFA challenges and forgotten login throttles
        pruned.update(await operators.prune(self.db))
        return pruned if any(pruned.values()) else None
