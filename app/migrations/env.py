"""Alembic environment: runs migrations over the async engine with one connection."""

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


# How long a migration's statement waits for a lock (docs/operations.md, zero-downtime migrations):
# behind a long transaction, an ALTER TABLE would otherwise queue every claim and enqueue behind
# itself; failing lets the operator retry when the database is quieter.
LOCK_TIMEOUT = "3s"


async def run_online() -> None:
    engine = create_async_engine(config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        # one migrator at a time, whichever replica or command starts first (a session lock: it
        # outlives the transactions below)
        await connection.exec_driver_sql("SELECT pg_advisory_lock(7265734)")
        await connection.exec_driver_sql(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        # Committed before Alembic starts: handed a connection inside a transaction, Alembic runs
        # every migration in that one transaction (transaction_per_migration is ignored), so the
        # locks of the first were held until the last ended, backfills included, and one failure
        # undid them all.
        await connection.commit()
        try:
            await connection.run_sync(run)
        finally:
            # a failed migration leaves its transaction aborted: end it, or the unlock fails too
            # and its error hides the migration's own
            await connection.rollback()
            await connection.exec_driver_sql("SELECT pg_advisory_unlock(7265734)")
            await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `python -m app migrate`")
asyncio.run(run_online())
