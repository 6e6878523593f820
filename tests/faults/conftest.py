"""The fault suite (`make faults`): real processes, a PostgreSQL it controls, a real sink.

Collected only by `make faults` (the `faults` marker, deselected by default in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tests.conftest import ROOT, truncate_all
from tests.faults import report
from tests.faults.pg import PgCluster
from tests.faults.procs import Deployment, free_port, run_cli, subprocess_env
from tests.faults.sink import Sink

DATABASE = "taskgate_faults"


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster(free_port())
    try:
        pg.start()

        async def create() -> None:
            conn = await asyncpg.connect(pg.admin_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await conn.close()

        asyncio.run(create())
        run_cli(["migrate"], subprocess_env(APP_ENV="test", DB_URI=pg.uri(DATABASE), LOG_FORMAT="console"))
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [sys.executable, "-m", "app", "dev-cert", "--dir", str(directory)],
        cwd=ROOT,
        env=subprocess_env(APP_ENV="test"),
        check=True,
        capture_output=True,
    )
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
async def deployment(
    cluster: PgCluster, certificate: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[Deployment]:
    """A clean database and the processes a scenario starts (all killed at the end)."""
    cluster.ensure_running()
    uri = cluster.uri(DATABASE)
    await truncate_all(uri)
    deployment = Deployment(uri, Fernet.generate_key().decode(), *certificate, tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not report.FIGURES:
        return
    terminalreporter.section("fault suite figures")
    terminalreporter.write_line(report.table())
    report.write_json()
    terminalreporter.write_line(f"(written to {report.RESULTS_PATH.relative_to(ROOT)})")
