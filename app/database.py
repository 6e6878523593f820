"""The database facade: connection pools, transactions, health and schema checks.

Two ways in. `driver()` hands out an asyncpg connection from a native asyncpg pool: every service
and the worker use it (checking a connection out of SQLAlchemy's async pool cost more than the
statements of an enqueue). `transaction()` is the SQLAlchemy engine (a small pool), for code that
works in SQLAlchemy and wants to enqueue inside its own transaction.

Every wait has a deadline (connect, pool checkout, each statement, and the server's own
`statement_timeout`), and both ways in turn a lost, refused or stalled database into one error,
`StorageUnavailable`, which the transport answers with 503 and Retry-After. Errors about the SQL
or its data (a unique violation, a CHECK) pass through unchanged.

This is the bottom layer: it imports nothing from the repositories or services above it. Nothing
here connects at import or construction; `connect()` runs inside the serving loop and
`disconnect()` closes the pools on shutdown (a module-level engine breaks as soon as a second
event loop appears, sqlalchemy#5626).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.settings import Settings
from app.src.utils import json_text

# How long a client is told to wait before retrying while the database is out of reach.
RETRY_AFTER_S = 1


class StorageUnavailable(Exception):
    """PostgreSQL cannot be reached in time (refused, reset, stalled, restarting, saturated).

    Nothing about the request is wrong and retrying later may succeed; the transport answers 503
    with `Retry-After`, and background loops back off and try again.
    """

    retry_after_s = RETRY_AFTER_S


# asyncpg's client-side errors about the arguments, not the connection
_CLIENT_ARGUMENT_ERRORS = (
    asyncpg_base.ClientConfigurationError,
    asyncpg_base.DataError,
    asyncpg_base.UnsupportedClientFeatureError,
    asyncpg_base.UnsupportedServerFeatureError,
)
_CONNECTION_ERRORS = (
    OSError,  # refused, reset, unreachable (ConnectionError is a subclass)
    TimeoutError,  # connect timeout, pool checkout, command_timeout
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    asyncpg.OperatorInterventionError,  # class 57: statement_timeout, shutdown, cannot connect now
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, out of memory or disk
    asyncpg.InterfaceError,  # the connection was closed or broken under the caller
    asyncpg.InternalClientError,  # the protocol lost its state (a connection cut mid-message);
    # also TargetServerAttributeNotMatched: no host of DB_URI is read-write (a failover under way)
    # a connection that outlived a demotion (Patroni): the server is a replica now; the connection
    # is dropped and the next one finds the new primary (target_session_attrs=read-write)
    asyncpg.ReadOnlySQLTransactionError,
)


def is_unstorable_value(error: BaseException) -> bool:
    """True when PostgreSQL (class 22) or the driver refused a value that a statement carried: a
    NUL in text, a number out of its column's range. Retrying the same statement cannot succeed."""
    return isinstance(error, asyncpg.DataError | asyncpg_base.DataError)


# text and jsonb refuse the NUL character: as a byte in text (22021), as \u0000 in jsonb (22P05)
_NUL_REFUSED = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


def is_refused_text(error: BaseException) -> bool:
    """True when PostgreSQL refused a statement for a NUL character in the text it carried: what a
    request sent that no column can hold (a 422), not a failure of the service."""
    if isinstance(error, sa_exc.DBAPIError):
        original = error.orig
        return original is not None and (
            isinstance(original, _NUL_REFUSED) or isinstance(original.__cause__, _NUL_REFUSED)
        )
    return isinstance(error, _NUL_REFUSED)


# Contention, not a fault of the request: PostgreSQL ended the transaction to break a deadlock or
# a serialization conflict (class 40), or a lock wait ran out (55P03). The same request, retried,
# succeeds; the connection itself is sound.
_CONTENDED = (asyncpg.TransactionRollbackError, asyncpg.LockNotAvailableError)


def is_contended(error: BaseException) -> bool:
    """True when PostgreSQL ended a statement for a conflict with another transaction."""
    if isinstance(error, sa_exc.DBAPIError):
        original = error.orig
        return original is not None and (
            isinstance(original, _CONTENDED) or isinstance(original.__cause__, _CONTENDED)
        )
    return isinstance(error, _CONTENDED)


def is_connection_failure(error: BaseException) -> bool:
    """True when `error` says the database is out of reach rather than that a statement is wrong."""
    if isinstance(error, StorageUnavailable):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        # SQLAlchemy wraps asyncpg's error in its DBAPI adapter, which keeps the original as cause
        original = error.orig
        return original is not None and (
            is_connection_failure(original)
            or (original.__cause__ is not None and is_connection_failure(original.__cause__))
        )
    if isinstance(error, sa_exc.TimeoutError):  # SQLAlchemy's pool checkout
        return True
    if isinstance(error, _CLIENT_ARGUMENT_ERRORS):
        return False
    return isinstance(error, _CONNECTION_ERRORS)


def unavailable(error: BaseException) -> StorageUnavailable:
    unreachable = StorageUnavailable(f"the database is unavailable ({type(error).__name__}: {error})")
    unreachable.__cause__ = error
    return unreachable


# SQLAlchemy's asyncpg engine without server-side prepared statements of its own: each statement
# is asyncpg's unnamed one, parsed again where it is executed (asyncpg re-parses unnamed statements
# when its own cache is off). SQLAlchemy's documented recipe for PgBouncer, a unique name per
# statement, prepared a named statement on the server for every statement and never deallocated
# it there: asyncpg's deferred close goes out in a later transaction, to whichever server
# connection PgBouncer hands out then, so through transaction pooling about half of them stayed
# on the server connections for their whole life, the backends' memory growing with every
# SQLAlchemy statement. And outside a transaction (autocommit) the prepare and the execution were
# two pooled transactions: "prepared statement ... does not exist". Alembic's engine uses it too.
NO_STATEMENT_CACHE: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: "",
}


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
        self.connect_timeout_s = settings.DB_CONNECT_TIMEOUT_S
        self.acquire_timeout_s = settings.DB_ACQUIRE_TIMEOUT_S
        self.command_timeout_s = settings.DB_COMMAND_TIMEOUT_S
        self._engine: AsyncEngine | None = None
        self._pool: asyncpg.Pool | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.connect() has not run (it runs in the serving lifecycle)")
        return self._engine

    @property
    def server_settings(self) -> dict[str, str]:
        """Session settings of every connection Taskgate opens.

        `statement_timeout` is the server's own bound: when a stalled network keeps the client's
        cancel request from arriving, the server still ends the statement and frees its locks.
        Waits that may last longer (long-polls, LISTEN) are never statements.
        """
        if self.behind_pgbouncer:
            # PgBouncer refuses start-up parameters it does not track, and in transaction mode a
            # session setting would land on whichever server connection is next: set them on the
            # role instead (docs/operations.md: ALTER ROLE ... SET statement_timeout, jit)
            return {"application_name": "taskgate"}
        statement_ms = int(self.settings.DB_STATEMENT_TIMEOUT_S * 1000)
        return {"application_name": "taskgate", "jit": "off", "statement_timeout": str(statement_ms)}

    @property
    def behind_pgbouncer(self) -> bool:
        """DB_POOLER=pgbouncer: no server-side prepared statement survives a transaction, so
        neither pool caches statements (NO_STATEMENT_CACHE)."""
        return self.settings.DB_POOLER == "pgbouncer"

    def _statement_cache_args(self) -> dict[str, Any]:
        return dict(NO_STATEMENT_CACHE) if self.behind_pgbouncer else {}

    async def connect(self) -> None:
        self._engine = create_async_engine(
            self.uri,
            pool_size=2,
            max_overflow=8,
            pool_timeout=self.acquire_timeout_s,
            pool_recycle=1800,
            pool_pre_ping=False,
            connect_args={
                "server_settings": self.server_settings,
                "timeout": self.connect_timeout_s,
                "command_timeout": self.command_timeout_s,
                **self._statement_cache_args(),
            },
        )
        args, kwargs = self.connect_args()
        try:
            self._pool = await asyncpg.create_pool(
                *args,
                **kwargs,
                min_size=min(self.pool_size, 4),
                max_size=self.pool_size,
                max_inactive_connection_lifetime=300,
                server_settings=self.server_settings,
                command_timeout=self.command_timeout_s,
                init=_set_codecs,
                reset=_keep_session,
                statement_cache_size=0 if self.behind_pgbouncer else 100,
            )
        except Exception as error:
            if is_connection_failure(error):
                raise unavailable(error) from error
            raise

    def connect_args(self, uri: str | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """asyncpg.connect() arguments for DB_URI, or another URI of the same form (host, socket,
        user, password, database, SSL, connect timeout)."""
        url = (
            self.engine.url
            if uri is None
            else make_url(uri.replace("postgresql://", "postgresql+asyncpg://", 1))
        )
        args, kwargs = self.engine.dialect.create_connect_args(url)
        drop = ("async_fallback", "prepared_statement_cache_size", "server_settings")
        kept = {k: v for k, v in kwargs.items() if k not in drop}
        kept["timeout"] = self.connect_timeout_s
        return tuple(args), kept

    def listen_args(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Where the process LISTENs: DB_URI, except behind PgBouncer (whose transaction mode
        cannot carry LISTEN): DB_LISTEN_URI, a direct connection, or None, and then every wait
        polls instead of being woken."""
        if not self.behind_pgbouncer:
            return self.connect_args()
        if self.settings.DB_LISTEN_URI:
            return self.connect_args(self.settings.DB_LISTEN_URI)
        return None

    async def disconnect(self, *, timeout_s: float | None = None) -> None:
        """Close the pools, within `timeout_s` each (at most DB_COMMAND_TIMEOUT_S): a pool's close
        waits for its connections to come back, and one held by something a stop left behind (a
        task that did not end when cancelled) would hold the stop; past it they are cut."""
        wait_s = self.command_timeout_s if timeout_s is None else min(self.command_timeout_s, timeout_s)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=wait_s)
            except Exception:  # a stalled or vanished server cannot be told goodbye
                pool.terminate()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(engine.dispose(), timeout=wait_s)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction that commits on success and rolls back on error."""
        try:
            async with self.engine.begin() as conn:
                yield conn
        except Exception as error:
            if is_connection_failure(error):
                raise unavailable(error) from error
            raise

    @asynccontextmanager
    async def driver(self, *, acquire_timeout_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection: autocommit unless the caller opens `conn.transaction()`.

        jsonb parameters go in as JSON text and come back decoded. Checking out waits at most
        DB_ACQUIRE_TIMEOUT_S and every statement DB_COMMAND_TIMEOUT_S; a database out of reach,
        while checking out or while using the connection, raises StorageUnavailable.
        """
        if self._pool is None:
            raise RuntimeError("Database.connect() has not run (it runs in the serving lifecycle)")
        pool = self._pool
        try:
            connection = await pool.acquire(timeout=acquire_timeout_s or self.acquire_timeout_s)
        except Exception as error:
            if is_connection_failure(error):
                raise unavailable(error) from error
            raise
        try:
            yield connection
        except Exception as error:
            if is_connection_failure(error):
                # a broken or stalled connection is not worth a graceful release: that would wait
                # on the same peer once more. (The pool may have let go of it already: a
                # connection lost under a failover; terminate() then raises InterfaceError.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
                raise unavailable(error) from error
            raise
        finally:
            with contextlib.suppress(Exception):  # asyncpg terminates what it cannot reset
                await pool.release(connection, timeout=self.command_timeout_s)

    async def ping(self, *, timeout_s: float = 1.0) -> bool:
        """True when a statement completes within `timeout_s` (checkout) plus `timeout_s` (query)."""
        try:
            async with self.driver(acquire_timeout_s=timeout_s) as conn:
                return bool(await conn.fetchval("SELECT 1", timeout=timeout_s) == 1)
        except StorageUnavailable:
            return False

    async def schema_at_head(self, heads: frozenset[str], *, timeout_s: float = 1.0) -> bool:
        """True when the database carries exactly the migration `heads` this code ships."""
        return await self.schema_revisions(timeout_s=timeout_s) == heads

    async def schema_revisions(self, *, timeout_s: float = 1.0) -> frozenset[str] | None:
        """The migration revisions the database carries; None when they cannot be read."""
        try:
            async with self.driver(acquire_timeout_s=timeout_s) as conn:
                rows = await conn.fetch("SELECT version_num FROM alembic_version", timeout=timeout_s)
        except (StorageUnavailable, asyncpg.UndefinedTableError):
            return None
        return frozenset(row["version_num"] for row in rows)
