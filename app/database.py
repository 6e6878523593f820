"""The Database facade: engine, transactions, repositories and their initialize().

Nothing here connects at import or construction; `connect()` runs inside the serving loop and
`disconnect()` disposes of the pool on shutdown (a module-level engine breaks as soon as a second
event loop appears, sqlalchemy#5626).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.settings import Settings
from app.src.database import migrations
from app.src.database.caches import QueueCache, QuotaCache


class Database:
    """One per process. Services take it as their first argument and own the transaction."""

    def __init__(self, settings: Settings) -> None:
        if not settings.DB_URI:
            raise ValueError("DB_URI is not set")
        self.settings = settings
        self.uri = settings.DB_URI
        self.pool_size = settings.DB_POOL_SIZE
        self._engine: AsyncEngine | None = None
        self.queues = QueueCache()
        self.quotas = QuotaCache()
        # storages whose initialize(db) runs once the engine exists
        self.repositories: list[Any] = [self.queues, self.quotas]

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.connect() has not run (it runs in the serving lifecycle)")
        return self._engine

    async def connect(self) -> None:
        self._engine = create_async_engine(
            self.uri,
            pool_size=self.pool_size,
            # overflow connections are closed on return (and re-prepare every statement when
            # reopened), so bursts get a little headroom and sustained load a right-sized pool
            max_overflow=self.pool_size // 2,
            pool_timeout=10,
            pool_recycle=1800,
            connect_args={"server_settings": {"application_name": "taskgate", "jit": "off"}},
        )
        for repository in self.repositories:
            await repository.initialize(self)

    async def disconnect(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction that commits on success and rolls back on error."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[asyncpg.Connection]:
        """The asyncpg connection under a pooled SQLAlchemy connection, for hot paths.

        Autocommit unless the caller opens `conn.transaction()`. jsonb parameters go in as JSON
        text and come back decoded (the codec SQLAlchemy's dialect installs).
        """
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            yield raw.driver_connection

    async def ping(self) -> bool:
        try:
            async with self.driver() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except Exception:
            return False

    async def schema_at_head(self) -> bool:
        """True when the database carries exactly the migrations this code ships."""
        try:
            async with self.driver() as conn:
                rows = await conn.fetch("SELECT version_num FROM alembic_version")
        except Exception:
            return False
        return {row["version_num"] for row in rows} == migrations.head_revisions()
