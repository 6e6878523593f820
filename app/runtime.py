"""The runtime layer: what a serving process starts, in order, and stops in reverse.

database → task engine → notifications → (outbound http) → (worker) → (scheduler); shutdown walks
the list backwards, so no job or task touches a closed pool or session.

A stop has two steps inside one WORKER_SHUTDOWN_GRACE_S: `begin_shutdown()` (on the stop signal,
before the HTTP server drains: stop claiming, and `shutting_down` tells long-polls and event
streams to answer now), then `stop()` (after the drain), whose waits share what is left.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from app.database import Database
from app.settings import Settings
from app.src.api.auth import Authenticator, active_signing_secrets
from app.src.api.engine.task_engine import SubmitRules, TaskEngine
from app.src.api.kinds import REGISTRY
from app.src.database import migrations
from app.src.utils import tracing

# TaskContext.resources key of the TaskEngine, for handlers that enqueue with `kind.enqueue(engine=...)`
ENGINE_RESOURCE = "engine"

if TYPE_CHECKING:
    from app.scheduler import Scheduler
    from app.src.api.http.client import OutboundHttp
    from app.src.database.notifications import Notifier
    from app.worker import Worker

log = structlog.get_logger("taskgate.runtime")

# A server that is shutting down ends long-polls and event streams with this Retry-After (seconds):
# another replica answers the next request.
SHUTDOWN_RETRY_AFTER_S = 1
# the database pools' close after a stop that used its whole grace: idle connections close in
# milliseconds; only a connection something left behind still holds waits this long
DISCONNECT_MIN_S = 0.25


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._db: Database | None = None
        self._engine: TaskEngine | None = None
        self.notifier: Notifier | None = None
        self.worker: Worker | None = None
        self.scheduler: Scheduler | None = None
        self.http: OutboundHttp | None = None
        # components handed to task handlers (TaskContext.resources) and scheduler jobs
        self.resources: dict[str, Any] = {}
        # the enqueue rules of this deployment; their payload context is the workers' one too
        self.rules = SubmitRules.from_settings(settings, kinds=REGISTRY)
        self.started = False
        # set by begin_shutdown(): whatever waits for a client (long-polls, event streams) ends now
        self.shutting_down = asyncio.Event()
        self._stop_deadline: float | None = None  # time.monotonic() by which stop() must be done
        self.events: list[str] = []  # start/stop order, for the lifecycle test
        self.authenticator = Authenticator(
            lambda: self.db, lookup_deadline_s=settings.DB_ACQUIRE_TIMEOUT_S + settings.DB_COMMAND_TIMEOUT_S
        )

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the runtime has not started")
        return self._db

    @property
    def engine(self) -> TaskEngine:
        if self._engine is None:
            raise RuntimeError("the runtime has not started")
        return self._engine

    async def start(self) -> None:
        from app.scheduler import Scheduler
        from app.src.api.http import RESOURCE_KEY
        from app.src.api.http.client import OutboundHttp
        from app.src.database.notifications import Notifier
        from app.worker import Worker

        roles = set(self.settings.ROLES)
        tracing.configure(service_name="taskgate")  # OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
        self._db = Database(self.settings)
        await self._db.connect()
        self.events.append("database started")
        self._engine = TaskEngine(self._db, self.rules)
        self.resources[ENGINE_RESOURCE] = self._engine
        self.notifier = Notifier(self._db.listen_args(), task_events="api" in roles)
        await self.notifier.start()
        self.events.append("notifier started")
        if roles & {"worker", "scheduler"}:  # http tasks run in workers and are polled by the scheduler
            self.http = OutboundHttp(
                self._db,
                self.settings,
                signing_secrets=self._signing_secrets,
                payload_context=self.rules.payload_context,
            )
            await self.http.start()
            self.resources[RESOURCE_KEY] = self.http
            self.events.append("outbound http started")
        if "worker" in roles:
            self.worker = Worker(
                self._db,
                self.notifier,
                self.settings,
                resources=self.resources,
                payload_context=self.rules.payload_context,
                queue_settings=self._engine.queues,
            )
            if self.http is not None:
                # this process's host permits carry the worker's id, the one its task leases carry:
                # rescuing a lease of this worker frees them too (RESCUE_EXPIRED)
                self.http.gate.process_id = self.worker.id
            if self.shutting_down.is_set():  # the stop signal came while starting
                self.worker.stop_claiming()
            await self.worker.start()
            self.events.append("worker started")
        if "scheduler" in roles:
            self.scheduler = Scheduler(self._db, self.settings, resources=self.resources, engine=self._engine)
            await self.scheduler.check_autovacuum()
            self.scheduler.start()
            self.events.append("scheduler started")
        self.started = True
        # Everything allocated so far (modules, schemas, models, pools) lives as long as the
        # process: move it out of the collector's sight, so full collections triggered by a
        # thousand-task batch do not walk the whole application heap each time.
        gc.freeze()
        log.info(
            "runtime started",
            roles=sorted(roles),
            kinds=[kind.name for kind in REGISTRY.all()],
            kind_modules=list(self.settings.TASK_KIND_MODULES),
            worker_concurrency=self.settings.WORKER_CONCURRENCY if "worker" in roles else None,
            db_pooler=self.settings.DB_POOLER,
            tracing=tracing.active(),
        )

    def begin_shutdown(self) -> None:
        """The first step of a stop: claim no more tasks and end the waits of clients, at once.

        Synchronous and idempotent, so a signal handler can call it; its grace period starts now.
        """
        if self.shutting_down.is_set():
            return
        self._stop_deadline = time.monotonic() + self.settings.WORKER_SHUTDOWN_GRACE_S
        self.shutting_down.set()
        if self.worker is not None:
            self.worker.stop_claiming()
        log.info("stopping", grace_s=self.settings.WORKER_SHUTDOWN_GRACE_S)

    def end_grace(self) -> None:
        """A forced stop (a second Ctrl-C or stop signal): the grace is over. `stop()` waits for
        no handler or job any more, but still hands back running tasks, writes the last
        completions and closes the pools (about a second); the worker's wait for its handlers
        ends now also when `stop()` is already in it (a scheduler wait keeps its deadline)."""
        self.begin_shutdown()
        self._stop_deadline = time.monotonic()
        if self.worker is not None:
            self.worker.end_grace()

    def grace_left(self) -> float:
        """Seconds left of the stop's grace period (all of it before the stop began)."""
        if self._stop_deadline is None:
            return self.settings.WORKER_SHUTDOWN_GRACE_S
        return max(0.0, self._stop_deadline - time.monotonic())

    async def stop(self) -> None:
        self.begin_shutdown()  # a no-op after the stop signal; the grace starts here otherwise
        if self.scheduler is not None:
            # maintenance runs in flight and running tasks share the one grace period
            self.scheduler.shutdown_grace_s = min(self.scheduler.shutdown_grace_s, self.grace_left())
            await self.scheduler.shutdown()
            self.scheduler = None
            self.events.append("scheduler stopped")
        if self.worker is not None:
            await self.worker.stop(grace_s=self.grace_left())
            self.worker = None
            self.events.append("worker stopped")
        if self.http is not None:
            self.resources.clear()
            await self.http.stop()
            self.http = None
            self.events.append("outbound http stopped")
        if self.notifier is not None:
            await self.notifier.stop()
            self.notifier = None
            self.events.append("notifier stopped")
        if self._engine is not None:
            # an insert batch in flight gets what is left of the grace (it waited up to its own
            # deadline, 4.5 s by default); past it the pool's close cuts it, and its requests, not
            # yet answered, get a 503
            await self._engine.close(timeout_s=max(self.grace_left(), DISCONNECT_MIN_S))
            self._engine = None
        if self._db is not None:
            # what is left of the grace (a moment at least, to say goodbye to the server): past
            # it, a connection still out is held by something the stop left behind
            await self._db.disconnect(timeout_s=max(self.grace_left(), DISCONNECT_MIN_S))
            self._db = None
            self.events.append("database stopped")
        self.started = False
        log.info("runtime stopped")

    async def _signing_secrets(self, client_id: UUID) -> list[str]:
        """The client's active signing secrets (whsec_..., newest first) for outbound requests:
        every one signs, so a rotation never leaves a receiver without a signature it knows."""
        return await active_signing_secrets(self.db, client_id=client_id)

    async def readiness(self) -> dict[str, bool]:
        if self._db is None:
            return {"database": False, "migrations": False}
        # both checks at once, each bounded: readiness answers within about 2 s, and false
        # while the database is out of reach
        reachable, revisions = await asyncio.gather(self._db.ping(), self._db.schema_revisions())
        checks = {"database": reachable, "migrations": migrations.serves(revisions)}
        roles = set(self.settings.ROLES)
        if "worker" in roles:
            checks["worker"] = self.worker is not None and self.worker.alive
        if "scheduler" in roles:
            checks["scheduler"] = self.scheduler is not None and self.scheduler.healthy()
        return checks
