"""The runtime layer: what a serving process starts, in order, and stops in reverse.

database → notifications → (outbound http) → (worker) → (scheduler); shutdown walks the list
backwards, so no job or task touches a closed pool or session.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from app.database import Database
from app.settings import Settings
from app.src.api.auth import Authenticator, active_signing_secrets

if TYPE_CHECKING:
    from app.scheduler import Scheduler
    from app.src.api.http.client import OutboundHttp
    from app.src.database.notifications import Notifier
    from app.worker import Worker

log = structlog.get_logger("taskgate.runtime")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._db: Database | None = None
        self.notifier: Notifier | None = None
        self.worker: Worker | None = None
        self.scheduler: Scheduler | None = None
        from app.src.api.models.http import ALLOWED_NETWORKS_CONTEXT

        self.http: OutboundHttp | None = None
        # components handed to task handlers (TaskContext.resources) and scheduler jobs
        self.resources: dict[str, Any] = {}
        # pydantic validation context of task payloads, the same at enqueue and in workers
        self.payload_context: dict[str, Any] = {
            ALLOWED_NETWORKS_CONTEXT: tuple(settings.HTTP_ALLOWED_NETWORKS)
        }
        self.started = False
        self.events: list[str] = []  # start/stop order, for the lifecycle test
        self.authenticator = Authenticator(lambda: self.db)

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the runtime has not started")
        return self._db

    async def start(self) -> None:
        from app.scheduler import Scheduler
        from app.src.api.http import RESOURCE_KEY
        from app.src.api.http.client import OutboundHttp
        from app.src.database.notifications import Notifier
        from app.worker import Worker

        roles = set(self.settings.ROLES)
        self._db = Database(self.settings)
        await self._db.connect()
        self.events.append("database started")
        self.notifier = Notifier(self._db.connect_args())
        await self.notifier.start()
        self.events.append("notifier started")
        if roles & {"worker", "scheduler"}:  # http tasks run in workers and are polled by the scheduler
            self.http = OutboundHttp(
                self._db,
                self.settings,
                signing_secrets=self._signing_secrets,
                payload_context=self.payload_context,
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
                payload_context=self.payload_context,
            )
            await self.worker.start()
            self.events.append("worker started")
        if "scheduler" in roles:
            self.scheduler = Scheduler(self._db, self.settings, resources=self.resources)
            self.scheduler.start()
            self.events.append("scheduler started")
        self.started = True
        # Everything allocated so far (modules, schemas, models, pools) lives as long as the
        # process: move it out of the collector's sight, so full collections triggered by a
        # thousand-task batch do not walk the whole application heap each time.
        gc.freeze()
        log.info("runtime started", roles=sorted(roles))

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.shutdown()
            self.scheduler = None
            self.events.append("scheduler stopped")
        if self.worker is not None:
            await self.worker.stop()
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
        if self._db is not None:
            await self._db.disconnect()
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
        checks = {
            "database": await self._db.ping(),
            "migrations": await self._db.schema_at_head(),
        }
        roles = set(self.settings.ROLES)
        if "worker" in roles:
            checks["worker"] = self.worker is not None and self.worker.alive
        if "scheduler" in roles:
            checks["scheduler"] = self.scheduler is not None and self.scheduler.healthy()
        return checks
