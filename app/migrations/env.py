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


async def run_online() -> None:
    engine = create_async_engine(config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        # one migrator at a time, whichever replica or command starts first
        await connection.exec_driver_sql("SELECT pg_advisory_lock(7265734)")
        try:
            await connection.run_sync(run)
        finally:
            await connection.exec_driver_sql("SELECT pg_advisory_unlock(7265734)")
            await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `python -m app migrate`")
asyncio.run(run_online())
