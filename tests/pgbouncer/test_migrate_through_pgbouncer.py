"""`python -m app migrate` (and `serve --migrate`) with DB_URI through PgBouncer in transaction mode,
while other clients use the same pool: each of its transactions may land on another server
connection, so nothing it relies on may outlive a transaction (a session advisory lock, a session
setting, a named prepared statement)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.src.database import migrations
from tests.faults.procs import run_cli, subprocess_env
from tests.pgbouncer.bouncer import PgBouncer
from tests.task_harness import eventually

pytestmark = pytest.mark.pgbouncer

MIGRATE_DATABASE = "taskgate_pgbouncer_migrate"
MIGRATION_LOCK = 7265734  # app/migrations/env.py


async def _waiting_for_the_lock(conn: asyncpg.Connection) -> bool:
    waiting = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted",
        MIGRATION_LOCK,
    )
    return bool(waiting >= 2)


def _driver(uri: str) -> str:
    return uri.replace("postgresql+asyncpg://", "postgresql://")


@contextlib.asynccontextmanager
async def _fresh_database(bouncers: dict[str, Any]) -> AsyncIterator[str]:
    admin = await asyncpg.connect(bouncers["cluster"].admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{MIGRATE_DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{MIGRATE_DATABASE}"')
        # as docs/operations.md asks behind PgBouncer (shorter here): a migrate waiting for the
        # other's lock waits longer than this, and must not be cut by it
        await admin.execute(f"ALTER DATABASE \"{MIGRATE_DATABASE}\" SET statement_timeout = '1s'")
        yield MIGRATE_DATABASE
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{MIGRATE_DATABASE}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def _other_clients(dsn: str, n: int = 6) -> AsyncIterator[None]:
    """Other clients of the pool (the replicas still serving): short transactions back to back,
    so that the migrator's next transaction gets whichever server connection is free."""
    stop = asyncio.Event()

    async def client() -> None:
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            while not stop.is_set():
                await conn.execute("SELECT pg_sleep(0.003)")
        finally:
            await conn.close()

    running = [asyncio.create_task(client()) for _ in range(n)]
    await asyncio.sleep(0.2)
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)


async def _server_settings(dsn: str, n: int) -> list[str]:
    """lock_timeout on every server connection of the pool (n client transactions at once hold n
    distinct server connections)."""
    conns = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(n)]
    try:
        txs = [conn.transaction() for conn in conns]
        for tx in txs:
            await tx.start()
        values = [str(await conn.fetchval("SHOW lock_timeout")) for conn in conns]
        for tx in txs:
            await tx.rollback()
        return values
    finally:
        for conn in conns:
            await conn.close()


async def test_migrate_through_transaction_pooling_leaves_no_lock_or_setting_behind(
    bouncers: dict[str, Any],
) -> None:
    """Migrate failed through transaction pooling: "prepared statement ... does not exist" (a
    statement of a backfill prepared in one transaction, executed in the next). And it took a
    session advisory lock and `SET lock_timeout`, then committed: through
    transaction pooling both stayed on a server connection handed to the next client (every
    statement of the service on it got a 3 s lock_timeout), the unlock landed on another one, and
    the lock stayed held, so the next release's migrate waited for it for ever. A migrate waiting
    for another's lock must wait past the role's statement_timeout (docs/operations.md sets one
    behind PgBouncer), not fail."""
    pool: PgBouncer = bouncers["transaction"]
    cluster = bouncers["cluster"]
    async with _fresh_database(bouncers) as name:
        pooled = pool.uri(name)
        env = subprocess_env(APP_ENV="test", DB_URI=pooled, DB_POOLER="pgbouncer", LOG_FORMAT="console")
        holder = await asyncpg.connect(_driver(cluster.uri(name)))
        async with _other_clients(_driver(pooled)):
            # another migrator holds the lock for longer than statement_timeout: both wait for it
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            # two at once (two replicas' `serve --migrate`): one waits for the other's lock, then
            # finds the schema at head
            migrating = asyncio.gather(*(asyncio.to_thread(run_cli, ["migrate"], env, 60) for _ in range(2)))
            await eventually(lambda: _waiting_for_the_lock(holder), timeout=30)
            await asyncio.sleep(1.5)  # past the statement_timeout
            await holding.rollback()
            await holder.close()
            await migrating
        direct = await asyncpg.connect(_driver(cluster.uri(name)))
        try:
            revisions = await direct.fetch("SELECT version_num FROM alembic_version")
            assert frozenset(r["version_num"] for r in revisions) == migrations.head_revisions()
            held = await direct.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted",
                MIGRATION_LOCK,
            )
            assert held == 0, "the migration lock outlived migrate, on a pooled server connection"
        finally:
            await direct.close()
        assert "3s" not in await _server_settings(_driver(pooled), 8)
        # the next migrate, on a direct connection as docs/operations.md advises, is not held up
        began = time.monotonic()
        direct_env = {**env, "DB_URI": cluster.uri(name), "DB_POOLER": "none"}
        await asyncio.to_thread(run_cli, ["migrate"], direct_env, 30)
        assert time.monotonic() - began < 20
