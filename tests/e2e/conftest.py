"""The real server process, over HTTPS, verified against the certificate it made for itself."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, subprocess_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "cert.pem"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_server(
    database_uri: str, data_dir: Path, *, roles: str = "api", env: dict[str, Any] | None = None
) -> ServerProcess:
    port = free_port()
    log_path = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as handle:
        process = _spawn(port, database_uri, data_dir, roles, env, handle)
    server = ServerProcess(process, f"https://localhost:{port}", data_dir, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server did not listen within 60 s:\n{server.log()}")


def _spawn(
    port: int, database_uri: str, data_dir: Path, roles: str, env: dict[str, Any] | None, handle: Any
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--roles", roles, "--port", str(port)],
        cwd=ROOT,
        env=subprocess_env(
            APP_ENV="test",
            DB_URI=database_uri,
            DATA_DIR=data_dir,
            HOST="127.0.0.1",
            LOG_FORMAT="json",
            **(env or {}),
        ),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def server(clean_database: str, tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(clean_database, tmp_path / "server")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def https(server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=server.ssl_context())
    async with aiohttp.ClientSession(base_url=server.base_url, connector=connector) as session:
        yield session


async def wait_ready(session: aiohttp.ClientSession, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get("/api/common/ready") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("server never became ready")
