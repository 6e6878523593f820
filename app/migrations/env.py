"""Alembic environment: runs migrations over the async engine with one connection.

Nothing a migration relies on outlives a transaction: behind PgBouncer in transaction mode (a
`migrate` or `serve --migrate` whose DB_URI is the pooled one) each transaction may run on another
server connection, the one just used goes to the next client, and a session advisory lock, a
session setting or a named prepared statement stays there or is missing in the next transaction.
"""

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import event, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from app.database import NO_STATEMENT_CACHE

config = context.config

# One migrator at a time, whichever replica or command starts first.
MIGRATION_LOCK = 7265734

# How long a migration's statement waits for a lock (docs/operations.md, zero-downtime migrations):
# behind a long transaction, an ALTER TABLE would otherwise queue every claim and enqueue behind
# itself; failing lets the operator retry when the database is quieter.
LOCK_TIMEOUT = "3s"


def _bound_lock_waits(conn: Connection, *_: Any) -> None:
    """`SET LOCAL lock_timeout` before the first statement of each transaction (a session SET would
    bound only the transactions that happen to run on the server connection it ran on). Statements
    of an `autocommit_block` (batched backfills) are transactions of their own: no SET can precede
    them in the same one, and they wait as long as the server's settings let them."""
    transaction = conn.get_transaction()
    dbapi_connection = conn.connection.dbapi_connection
    if transaction is None or dbapi_connection is None or conn.info.get("lock_timeout_in") is transaction:
        return
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    conn.info["lock_timeout_in"] = transaction
    dbapi_connection.cursor().execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")


def run(connection: Connection) -> None:
    event.listen(connection, "before_cursor_execute", _bound_lock_waits)
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    # no server-side prepared statement kept across transactions (a migration runs each statement a
    # few times at most): a named one, prepared and then executed in two round trips where no
    # transaction was open (an `autocommit_block`), met another server connection the second time
    engine = create_async_engine(
        config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool, connect_args=NO_STATEMENT_CACHE
    )
    try:
        async with engine.connect() as lock:
            # The lock is a transaction's, held open on a connection of its own until the migrations
            # are done: a session lock taken and committed stayed, through transaction pooling, on a
            # server connection of the pool after the unlock ran on another, and the next migrate
            # waited for it for ever. Ended by the rollback below, or by the server when this
            # process dies (its connection closes, and PgBouncer drops a server connection left in
            # a transaction). It waits for another migrator however long that one takes.
            await lock.exec_driver_sql("SET LOCAL statement_timeout = 0")
            await lock.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
            await lock.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            try:
                # Each migration in a transaction of its own (transaction_per_migration): handed a
                # connection inside a transaction, Alembic would run them all in that one, holding
                # the locks of the first until the last ended, backfills included.
                async with engine.connect() as connection:
                    await connection.run_sync(run)
            finally:
                await lock.rollback()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `python -m app migrate`")
asyncio.run(run_online())
