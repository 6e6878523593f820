"""The runtime layer: what a serving process starts, in order, and stops in reverse.

database → (worker) → (scheduler); shutdown walks the list backwards so no job or task touches a
closed pool.
"""

from __future__ import annotations

import structlog

from app.database import Database
from app.settings import Settings
from app.src.api.auth import Authenticator

log = structlog.get_logger("taskgate.runtime")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._db: Database | None = None
        self.started = False
        self.authenticator = Authenticator(lambda: self.db)

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the runtime has not started")
        return self._db

    async def start(self) -> None:
        self._db = Database(self.settings)
        await self._db.connect()
        self.started = True
        log.info("runtime started", roles=self.settings.ROLES)

    async def stop(self) -> None:
        if self._db is not None:
            await self._db.disconnect()
            self._db = None
        self.started = False
        log.info("runtime stopped")

    async def readiness(self) -> dict[str, bool]:
        if self._db is None:
            return {"database": False, "migrations": False}
        return {
            "database": await self._db.ping(),
            "migrations": await self._db.schema_at_head(),
        }
