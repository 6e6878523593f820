"""Migrations on a live database: each in a transaction of its own, lock waits bounded."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from app.__main__ import migrate
from app.settings import Settings
from app.src.database import migrations
from app.src.database.embedded import create_database
from tests.conftest import driver_uri


@pytest.fixture
async def fresh_database(database_uri: str) -> AsyncIterator[str]:
    """An empty database of its own (this test's migrations must not touch the suite's)."""
    name = f"taskgate_migrations_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    admin = await asyncpg.connect(driver_uri(database_uri))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await create_database(driver_uri(database_uri), name)
        yield urlunsplit(urlsplit(database_uri)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_migration_waiting_for_a_lock_holds_no_earlier_ones_lock_and_fails_with_its_cause(
    fresh_database: str,
) -> None:
    """Upgrading 0010 → head while a transaction reads task_steps: 0012 (ALTER TABLE task_steps)
    waits for it. Alembic once ran every pending migration in one transaction, so 0011's lock on
    tasks was held meanwhile (no claim, enqueue or read of a task; through 0013's backfill on a
    good day), the failure undid 0011 too, and the error said only 'current transaction is
    aborted', the unlock's, not the lock timeout."""
    await asyncio.to_thread(migrations.upgrade, fresh_database, "0010")
    reader = await asyncpg.connect(driver_uri(fresh_database))
    other = await asyncpg.connect(driver_uri(fresh_database))
    try:
        reading = reader.transaction()
        await reading.start()
        await reader.execute("LOCK task_steps IN ACCESS SHARE MODE")  # what any SELECT takes
        upgrade = asyncio.create_task(asyncio.to_thread(migrations.upgrade, fresh_database))
        await asyncio.sleep(1.0)  # 0011 is done, 0012 waits for the lock
        assert not upgrade.done()
        await other.execute("SET lock_timeout = '500ms'")
        assert await other.fetchval("SELECT count(*) FROM tasks") == 0  # tasks is not locked
        with pytest.raises(DBAPIError, match="lock timeout"):
            await asyncio.wait_for(upgrade, timeout=30)
        await reading.rollback()
        assert await other.fetchval("SELECT version_num FROM alembic_version") == "0011"
        await asyncio.to_thread(migrations.upgrade, fresh_database)  # once it is quiet: done
        assert await other.fetchval("SELECT version_num FROM alembic_version") in migrations.head_revisions()
    finally:
        await reader.close()
        await other.close()


async def test_migrate_says_in_one_line_why_it_failed(
    fresh_database: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m app migrate` once printed a traceback for a lock timeout or a database out of
    reach; a Job's log should say what happened, and that running it again is safe."""
    await asyncio.to_thread(migrations.upgrade, fresh_database, "0011")
    reader = await asyncpg.connect(driver_uri(fresh_database))
    try:
        async with reader.transaction():
            await reader.execute("LOCK task_steps IN ACCESS SHARE MODE")
            with pytest.raises(SystemExit) as exit_info:
                await asyncio.to_thread(migrate, settings.model_copy(update={"DB_URI": fresh_database}))
    finally:
        await reader.close()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taskgate: migrations failed: "), err
    assert "lock timeout" in err, err
    assert "\n" not in err
    unreachable = settings.model_copy(update={"DB_URI": "postgresql+asyncpg://taskgate@127.0.0.1:9/none"})
    with pytest.raises(SystemExit):
        await asyncio.to_thread(migrate, unreachable)
    err = capsys.readouterr().err.strip()
    assert err.startswith("taskgate: migrations failed: "), err
    assert "\n" not in err, err


async def test_backfills_commit_batch_by_batch_and_count_what_was_stored(fresh_database: str) -> None:
    """0013 (flag the wait records) and 0017 (count each durable task's stored state) over data
    stored before them. Each batch commits on its own: run in the migration's transaction, every
    row they touched stayed locked until the last batch, so the release still serving could not
    claim, complete or signal those tasks for the whole backfill."""
    await asyncio.to_thread(migrations.upgrade, fresh_database, "0011")
    conn = await asyncpg.connect(driver_uri(fresh_database))
    try:
        client = uuid.uuid4()
        queue_id = await conn.fetchval(
            "INSERT INTO queues (client_id, name) VALUES ($1, 'q') RETURNING id", client
        )
        await conn.execute(
            """
            INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts,
                               run_at, durable)
            SELECT gen_random_uuid(), $1, $2, 'q', 'noop', '{}', 'available', 3, now(), true
            FROM generate_series(1, 2500)
            """,
            client,
            queue_id,
        )
        await conn.execute("INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, "
                           "max_attempts, run_at) VALUES (gen_random_uuid(), $1, $2, 'q', 'noop', '{}', "
                           "'available', 3, now())", client, queue_id)  # fmt: skip
        await conn.execute(
            """
            INSERT INTO task_steps (task_id, name, result)
            SELECT id, step.name, step.result FROM tasks, (VALUES
                ('a', '{"n": 12345}'::jsonb),
                ('nap', '{"sleep_until": "2026-12-07T10:00:00+00:00"}'::jsonb),
                ('w', '{"wait_until": null}'::jsonb)
            ) AS step (name, result)
            WHERE durable
            """
        )
        await conn.execute(
            "INSERT INTO task_signals (task_id, name, data) "
            "SELECT id, 's', '[1, 2, 3]' FROM tasks WHERE durable"
        )

        await asyncio.to_thread(migrations.upgrade, fresh_database)

        # the step result's text and the signal's: 12 + 9 bytes; wait records are not state
        counted = await conn.fetch("SELECT durable, state_bytes, count(*) FROM tasks GROUP BY 1, 2")
        assert sorted(tuple(row) for row in counted) == [(False, 0, 1), (True, 21, 2500)]
        flags = await conn.fetch("SELECT name, wait, count(*) FROM task_steps GROUP BY 1, 2 ORDER BY 1")
        assert [tuple(row) for row in flags] == [("a", False, 2500), ("nap", True, 2500), ("w", True, 2500)]
        # 2,500 tasks in batches of 1,000, 7,500 steps in batches of 5,000: one transaction each
        assert await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM tasks WHERE durable") == 3
        assert await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM task_steps WHERE wait") == 2
    finally:
        await conn.close()
