"""APScheduler 3 in the serving process: the cluster-safe maintenance jobs.

Every job runs at most once per period across all replicas (an election on a row of
`maintenance_jobs`), is logged and counted in metrics, and readiness turns false when a job has
not succeeded for several periods. The scheduler starts in the serving lifecycle, needs the
running loop, and is shut down before the database closes.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.src.api.http import RESOURCE_KEY as HTTP
from app.src.api.http.poller import poll_waiting_http
from app.src.database import maintenance
from app.src.database import tasks as task_store
from app.src.utils.metrics import QUEUE_DEPTH, SCHEDULER_DURATION, SCHEDULER_LAST_SUCCESS, SCHEDULER_RUNS

if TYPE_CHECKING:
    from app.database import Database
    from app.settings import Settings

log = structlog.get_logger("taskgate.scheduler")
STALE_PERIODS = 5  # readiness fails after this many periods without a success


@dataclass(frozen=True)
class Job:
    name: str
    period_s: float
    run: Callable[[], Awaitable[Any]]
    cluster_wide: bool = True  # False: every replica runs it (its own caches)


class Scheduler:
    def __init__(
        self, db: Database, settings: Settings, *, resources: Mapping[str, Any] | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.resources: Mapping[str, Any] = resources or {}
        self.replica = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._scheduler: AsyncIOScheduler | None = None
        self._last_success: dict[str, float] = {}
        self._running_jobs: set[asyncio.Task[Any]] = set()
        self.jobs = [
            Job("rescue_expired_leases", settings.RESCUE_INTERVAL_S, self.rescue_expired_leases),
            Job("refresh_caches", 5.0, self.refresh_caches, cluster_wide=False),
            Job("prune", 300.0, self.prune),
            Job(
                "poll_waiting_http",
                settings.HTTP_POLL_INTERVAL_S,
                lambda: poll_waiting_http(self.db, self.resources.get(HTTP)),
            ),
            Job("http_host_health", 5.0, self.http_host_health, cluster_wide=False),
        ]

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        scheduler = AsyncIOScheduler(timezone="UTC")
        for job in self.jobs:
            scheduler.add_job(
                self._run,
                "interval",
                seconds=job.period_s,
                args=[job],
                id=job.name,
                coalesce=True,
                max_instances=1,
                next_run_time=None,
            )
            self._last_success[job.name] = time.monotonic()
        scheduler.start()
        for job in self.jobs:  # first runs right away, not one period after start
            scheduler.modify_job(job.name, next_run_time=_now())
        self._scheduler = scheduler
        log.info("scheduler started", jobs=[job.name for job in self.jobs], replica=self.replica)

    async def shutdown(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._running_jobs:
            await asyncio.wait(self._running_jobs, timeout=10)
        self._scheduler = None
        log.info("scheduler stopped")

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def healthy(self) -> bool:
        now = time.monotonic()
        return self.running and all(
            now - self._last_success.get(job.name, now) <= max(job.period_s * STALE_PERIODS, 30.0)
            for job in self.jobs
        )

    async def _run(self, job: Job) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._running_jobs.add(task)
        started = time.perf_counter()
        try:
            elected = True
            if job.cluster_wide:
                async with self.db.driver() as conn:
                    elected = await maintenance.elect(
                        conn, job=job.name, min_interval_s=job.period_s * 0.8, replica=self.replica
                    )
            if elected:
                outcome = await job.run()
                if job.cluster_wide:
                    async with self.db.driver() as conn:
                        await maintenance.succeeded(conn, job=job.name)
                SCHEDULER_RUNS.labels(job.name, "success").inc()
                SCHEDULER_DURATION.labels(job.name).observe(time.perf_counter() - started)
                SCHEDULER_LAST_SUCCESS.labels(job.name).set_to_current_time()
                if outcome:
                    log.info("maintenance job ran", job=job.name, result=outcome)
            else:
                SCHEDULER_RUNS.labels(job.name, "skipped").inc()
            # a skipped run is healthy too: another replica holds this period
            self._last_success[job.name] = time.monotonic()
        except Exception:
            SCHEDULER_RUNS.labels(job.name, "failure").inc()
            log.exception("maintenance job failed", job=job.name)
        finally:
            if task is not None:
                self._running_jobs.discard(task)

    # --- jobs ------------------------------------------------------------------------------------

    async def rescue_expired_leases(self) -> dict[str, int] | None:
        async with self.db.driver() as conn:
            rescued = await task_store.rescue_expired(conn)
        if not rescued:
            return None
        by_status: dict[str, int] = {}
        for row in rescued:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        return by_status

    async def refresh_caches(self) -> None:
        self.db.queues.clear()
        async with self.db.driver() as conn:
            depths = await maintenance.queue_depths(conn)
        QUEUE_DEPTH.clear()
        for row in depths:
            QUEUE_DEPTH.labels(row["name"], row["status"]).inc(row["n"])

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
        return {"tasks": tasks, "idempotency_keys": keys} if tasks or keys else None


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
