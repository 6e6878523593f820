"""The SQLAlchemy engine behind PgBouncer's transaction pooling (`kind.enqueue(db=…)` inside the
caller's own transaction): nothing it prepares may stay on the server connections."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from app.database import Database
from app.src.api.kinds import REGISTRY, load_kinds
from app.src.api.kinds.builtin import NoopPayload
from app.src.api.models.auth import IssuedKey
from tests.pgbouncer.bouncer import PgBouncer

pytestmark = pytest.mark.pgbouncer

load_kinds()


async def _prepared_on_every_server_connection(pool: PgBouncer) -> list[int]:
    """pg_prepared_statements of each server connection of the pool: as many client transactions
    at once as the pool has server connections hold one each."""
    dsn = pool.uri().replace("postgresql+asyncpg://", "postgresql://")
    conns = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(pool.pool_size)]
    try:
        transactions = [conn.transaction() for conn in conns]
        for transaction in transactions:
            await transaction.start()
        counts = [int(await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")) for conn in conns]
        for transaction in transactions:
            await transaction.rollback()
        return counts
    finally:
        for conn in conns:
            await conn.close()


async def test_enqueues_in_the_callers_transaction_leave_no_prepared_statement_on_the_server(
    db: Database, api_client: IssuedKey, bouncers: dict[str, Any], pooling: dict[str, Any]
) -> None:
    """SQLAlchemy's recipe for PgBouncer (a unique name per statement) prepared a named statement
    on the server for each statement and never deallocated it there (asyncpg's deferred close went
    to whichever server connection came next): through transaction pooling about half of them
    stayed for the server connection's life, PostgreSQL's memory growing with every enqueue."""
    if pooling["mode"] == "session":
        pytest.skip("transaction pooling only: in session mode a client keeps its server connection")
    noop = REGISTRY.get("noop")
    assert noop is not None

    async def enqueue_some(n: int) -> None:
        for _ in range(n):
            async with db.transaction() as conn:
                await noop.enqueue(NoopPayload(), db=conn, client_id=api_client.client_id)

    pool: PgBouncer = bouncers["transaction"]
    before = sum(await _prepared_on_every_server_connection(pool))  # other tests' (the control's)
    await asyncio.gather(*(enqueue_some(15) for _ in range(8)))
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 120
    left = await _prepared_on_every_server_connection(pool)
    assert sum(left) == before, left
