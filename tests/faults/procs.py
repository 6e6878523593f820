"""The real Taskgate processes under test: `python -m app serve|worker|migrate|admin`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ROOT, subprocess_env

# Settings every process of the suite shares: short leases and fast rescue so that faults show
# within seconds; the sink on 127.0.0.1 must be reachable (the SSRF guard refuses loopback).
BASE_ENV: dict[str, str] = {
    "APP_ENV": "test",
    "LOG_FORMAT": "json",
    "HOST": "127.0.0.1",
    "HTTP_ALLOWED_NETWORKS": "127.0.0.0/8",
    "HTTP_HOST_MAX_CONCURRENCY": "1000",
    "LEASE_SECONDS": "4",
    "RESCUE_INTERVAL_S": "0.5",
    "WORKER_POLL_INTERVAL_S": "0.2",
    "WORKER_SHUTDOWN_GRACE_S": "3",
    "WORKER_CONCURRENCY": "100",
}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: one that bind(0) hands out is in that
    range, where the outbound connections of the processes started since (a cluster's nodes among
    themselves) may take it as their local port, and the server meant to listen on it then fails
    with "Address already in use" (a Patroni node never started)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(10_000, low) if low > 12_000 else range(0)
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    exit_time: float | None = None

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: int) -> float:
        sent = time.time()
        if self.alive():
            self.process.send_signal(sig)
        return sent

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if it did not exit within timeout (it is then still running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.exit_time = self.exit_time or time.time()
                return code
            await asyncio.sleep(0.02)
        return None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@dataclass
class Deployment:
    """Every process a scenario starts; whatever is still running at the end is killed."""

    db_uri: str
    secret_key: str
    cert: Path
    key: Path
    work: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self, db_uri: str | None = None, **extra: Any) -> dict[str, str]:
        values: dict[str, Any] = {
            **BASE_ENV,
            "DB_URI": db_uri or self.db_uri,
            "SECRET_KEYS": self.secret_key,
            "SSL_CERTFILE": self.cert,
            "SSL_KEYFILE": self.key,
        }
        values.update(extra)
        return subprocess_env(**values)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], port: int | None) -> Proc:
        data_dir = self.work / name
        data_dir.mkdir(parents=True, exist_ok=True)
        env["DATA_DIR"] = str(data_dir)
        log_path = data_dir / f"{name}-{time.monotonic_ns()}.log"
        with log_path.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", *args],
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, process, log_path, port)
        self.procs.append(proc)
        return proc

    def server(self, name: str, *, roles: str | None = None, db_uri: str | None = None, **extra: Any) -> Proc:
        port = free_port()
        args = ["serve", "--port", str(port)]
        if roles:
            args += ["--roles", roles]
        return self._spawn(name, args, self.env(db_uri, **extra), port)

    def worker(self, name: str, *, db_uri: str | None = None, **extra: Any) -> Proc:
        return self._spawn(name, ["worker"], self.env(db_uri, **extra), None)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def session(self, proc: Proc, **kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(), limit=200)
        return aiohttp.ClientSession(base_url=proc.base_url, connector=connector, **kwargs)

    async def ready(self, *procs: Proc, timeout: float = 90) -> None:
        """Wait until each server answers ready and each worker logged that it started."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            while True:
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited with {proc.process.poll()}:\n{proc.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{proc.name} not ready within {timeout} s:\n{proc.log()}")
                if proc.port is None:
                    if "worker started" in proc.log(tail=10**7):
                        break
                else:
                    with _suppress():
                        async with self.session(proc) as http, http.get("/api/common/ready") as answer:
                            if answer.status == 200:
                                break
                await asyncio.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.process.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.kill()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], aiohttp.ClientError | OSError | asyncio.TimeoutError)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"python -m app {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def create_api_key(deployment: Deployment, name: str, scopes: list[str] | None = None) -> str:
    scopes = scopes or ["tasks:read", "tasks:write", "queues:admin", "schedules:admin", "clients:admin"]
    out = run_cli(
        [
            "admin",
            "create-client",
            "--name",
            name,
            "--scopes",
            *scopes,
            "--rate-limit-per-s",
            "1000000",
            "--json",
        ],
        deployment.env(DATA_DIR=str(deployment.work)),
    )
    return str(json.loads(out.strip().splitlines()[-1])["api_key"])
