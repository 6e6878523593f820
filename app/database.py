"""The Database facade: connection pools, transactions, caches and each storage's initialize().

Two ways in. `driver()` hands out an asyncpg connection from a native asyncpg pool: every service
and the worker use it (checking a connection out of SQLAlchemy's async pool cost more than the
statements of an enqueue). `transaction()` is the SQLAlchemy engine (a small pool), for code that
works in SQLAlchemy and wants to enqueue inside its own transaction.

Nothing here connects at import or construction; `connect()` runs inside the serving loop and
`disconnect()` closes the pools on shutdown (a module-level engine breaks as soon as a second
event loop appears, sqlalchemy#5626).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.settings import Settings
from app.src.api.errors import ServiceUnavailable
from app.src.api.models.tasks import Task
from app.src.database import migrations
from app.src.database import tasks as task_store
from app.src.database.caches import QueueCache, QuotaCache
from app.src.utils import json_text
from app.src.utils.coalesce import Coalescer

POOL_TIMEOUT_S = 10.0


async def _set_codecs(connection: asyncpg.Connection) -> None:
    # the same convention as SQLAlchemy's asyncpg dialect: JSON text in, Python objects out
    for name in ("json", "jsonb"):
        binary = name == "jsonb"
        await connection.set_type_codec(
            name,
            schema="pg_catalog",
            encoder=(lambda text: b"\x01" + text.encode()) if binary else (lambda text: text),
            decoder=(lambda data: json_text.loads(data[1:])) if binary else json_text.loads,
            format="binary" if binary else "text",
        )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's default reset query.

    The default (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) is a round trip on
    every release, as much as the statement an enqueue runs. asyncpg still rolls back an open
    transaction and drops listeners before this hook; the rest cannot be left behind by Taskgate:
    its advisory locks are transaction-scoped (`pg_advisory_xact_lock`), settings are `SET LOCAL`,
    cursors live inside transactions and LISTEN has its own connection (Notifier).
    """


class Database:
    """One per process. Services take it as their first argument and own the transaction."""

    def __init__(self, settings: Settings) -> None:
        if not settings.DB_URI:
            raise ValueError("DB_URI is not set")
        self.settings = settings
        self.uri = settings.DB_URI
        self.pool_size = settings.DB_POOL_SIZE
        self._engine: AsyncEngine | None = None
        self._pool: asyncpg.Pool | None = None
        self.queues = QueueCache()
        self.quotas = QuotaCache()
        # single enqueues of concurrent requests share one INSERT (group commit)
        self.task_inserts: Coalescer[task_store.NewTask, Task] = Coalescer(self._insert_tasks)
        # storages whose initialize(db) runs once the engine exists
        self.repositories: list[Any] = [self.queues, self.quotas]

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.connect() has not run (it runs in the serving lifecycle)")
        return self._engine

    async def connect(self) -> None:
        server_settings = {"application_name": "taskgate", "jit": "off"}
        self._engine = create_async_engine(
            self.uri,
            pool_size=2,
            max_overflow=8,
            pool_timeout=10,
            pool_recycle=1800,
            connect_args={"server_settings": server_settings},
        )
        self._pool = await asyncpg.create_pool(
            *self.connect_args()[0],
            **self.connect_args()[1],
            min_size=min(self.pool_size, 4),
            max_size=self.pool_size,
            max_inactive_connection_lifetime=300,
            server_settings=server_settings,
            init=_set_codecs,
            reset=_keep_session,
        )
        for repository in self.repositories:
            await repository.initialize(self)

    def connect_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """asyncpg.connect() arguments for DB_URI (host, socket, user, password, database, SSL)."""
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        drop = ("async_fallback", "prepared_statement_cache_size", "server_settings")
        return tuple(args), {k: v for k, v in kwargs.items() if k not in drop}

    async def disconnect(self) -> None:
        await self.task_inserts.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
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
        """A pooled asyncpg connection: autocommit unless the caller opens `conn.transaction()`.

        jsonb parameters go in as JSON text and come back decoded. When every connection is busy
        for POOL_TIMEOUT_S, the caller gets 503 with Retry-After instead of an unbounded queue.
        """
        if self._pool is None:
            raise RuntimeError("Database.connect() has not run (it runs in the serving lifecycle)")
        try:
            connection = await self._pool.acquire(timeout=POOL_TIMEOUT_S)
        except TimeoutError:
            raise ServiceUnavailable("The database is saturated; retry shortly.", retry_after=1) from None
        try:
            yield connection
        finally:
            await self._pool.release(connection)

    async def _insert_tasks(self, tasks: list[task_store.NewTask]) -> list[Task]:
        async with self.driver() as conn:
            return await task_store.insert_tasks(conn, tasks)

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
