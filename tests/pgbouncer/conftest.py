"""The PgBouncer suite (`make test-pgbouncer`): the engine's core cases with the service behind
Debian's PgBouncer, in transaction mode (with and without a direct LISTEN connection) and in
session mode.

The PostgreSQL server is the fault suite's (tests/faults/pg.py). Fixtures of tests/conftest.py are
overridden so that the service (`settings`, hence `db`, `engine`, `serving`) goes through PgBouncer
while the tests' own checks (`clean_database`, `fetch`) read the server directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.settings import Settings, load_settings
from tests.conftest import TEST_SETTINGS
from tests.faults.pg import PgCluster
from tests.faults.procs import free_port, run_cli, subprocess_env
from tests.pgbouncer import bouncer
from tests.pgbouncer.bouncer import PgBouncer

DATABASE = "taskgate_pgbouncer"
MODES = ("transaction", "transaction+listen", "session")


@pytest.fixture(scope="session")
def bouncers() -> Iterator[dict[str, Any]]:
    if not bouncer.available():
        pytest.skip(f"no pgbouncer binary at {bouncer.BINARY} (apt-get install -y pgbouncer)")
    pg = PgCluster(free_port())
    started: list[PgBouncer] = []
    try:
        pg.start()

        async def create() -> None:
            conn = await asyncpg.connect(pg.admin_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
                # behind PgBouncer these are the role's or database's settings, not start-up ones
                await conn.execute(f"ALTER DATABASE \"{DATABASE}\" SET statement_timeout = '5s'")
                await conn.execute(f'ALTER DATABASE "{DATABASE}" SET jit = off')
            finally:
                await conn.close()

        asyncio.run(create())
        # the suite's schema, made directly (test_migrate_through_pgbouncer.py migrates through it)
        run_cli(["migrate"], subprocess_env(APP_ENV="test", DB_URI=pg.uri(DATABASE), LOG_FORMAT="console"))
        for mode in ("transaction", "session"):
            # session mode holds a server connection per client connection: size it for every
            # pool of every process (docs/operations.md); transaction mode shares a few
            pool = PgBouncer(
                pg, DATABASE, port=free_port(), pool_mode=mode, pool_size=8 if mode == "transaction" else 150
            )
            started.append(pool)
            pool.start()
        yield {"cluster": pg, "transaction": started[0], "session": started[1]}
    finally:
        for pool in started:
            pool.stop()
        pg.destroy()


@pytest.fixture(scope="session")
def database_uri(bouncers: dict[str, Any]) -> str:
    """The server itself: what the tests' own checks and clean-ups read (not the service)."""
    return str(bouncers["cluster"].uri(DATABASE))


@pytest.fixture(params=MODES)
def pooling(request: pytest.FixtureRequest, bouncers: dict[str, Any], database_uri: str) -> dict[str, Any]:
    mode: str = request.param
    pool: PgBouncer = bouncers["session" if mode == "session" else "transaction"]
    overrides: dict[str, Any] = {"DB_URI": pool.uri(), "DB_POOLER": "pgbouncer"}
    if mode == "transaction+listen":
        overrides["DB_LISTEN_URI"] = database_uri  # a direct connection for LISTEN only
    elif mode == "session":
        overrides["DB_LISTEN_URI"] = pool.uri()  # session mode carries LISTEN through PgBouncer
    return {"mode": mode, **overrides}


@pytest.fixture
def settings(pooling: dict[str, Any], secret_keys: list[str], tmp_path: Path) -> Settings:
    service = {k: v for k, v in pooling.items() if k != "mode"}
    return load_settings(
        **TEST_SETTINGS, **service, SECRET_KEYS=secret_keys, DATA_DIR=tmp_path, ROLES=["api"]
    )
