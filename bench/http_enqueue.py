"""Enqueue over HTTPS: Taskgate's POST /api/tasks (auth + validation + insert) under wrk, beside bare
Quart endpoints served with the same uvicorn and TLS settings; and batch enqueue over HTTPS.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from app.src.encryption.certs import ensure_dev_certificate
from bench.server import DATA_DIR, ROOT, BenchServer, sqlalchemy_uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


def taskgate_env(db_uri: str, cert: Path, key: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "APP_ENV": "prod",
        "DB_URI": sqlalchemy_uri(db_uri),
        "SECRET_KEYS": "zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI=",
        "SSL_CERTFILE": str(cert),
        "SSL_KEYFILE": str(key),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "CLIENT_MAX_QUEUED_TASKS": str(10**9),
        **({"DB_POOL_SIZE": os.environ["POOL"]} if os.environ.get("POOL") else {}),
    }


def wrk(url: str, *, key: str = "", seconds: int = 10, connections: int = 32) -> dict[str, float]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "enqueue.lua"),
            url,
        ],
        env={**os.environ, "TG_KEY": key},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "requests_per_s": rps,
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def _latency(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def batch_enqueue(
    base: str,
    key: str,
    cafile: Path,
    *,
    batches: int = 40,
    size: int = 1000,
    parallel: int = 4,
    queue: str = "default",
) -> float:
    context = ssl.create_default_context(cafile=str(cafile))
    body = json.dumps({"tasks": [{"queue": queue, "kind": "noop", "payload": {"i": i}} for i in range(size)]})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        pending: asyncio.Queue[int] = asyncio.Queue()
        for i in range(batches):
            pending.put_nowait(i)

        async def sender() -> None:
            while not pending.empty():
                pending.get_nowait()
                async with session.post(f"{base}/api/tasks/batch", data=body, headers=headers) as response:
                    assert response.status == 201, await response.text()

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(parallel)))
        return batches * size / (time.perf_counter() - started)


def create_client(env: dict[str, str], *scopes: str) -> str:
    return create_client_id(env, *scopes)[1]


def create_client_id(env: dict[str, str], *scopes: str) -> tuple[str, str]:
    """A client with tasks:read/write and `scopes`, created with the admin CLI: (client id, API key)."""
    out = subprocess.run(
        [sys.executable, "-m", "app", "admin", "create-client", "--name", "bench", "--scopes", "tasks:write",
         "tasks:read", *scopes, "--rate-limit-per-s", "1000000", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    created = json.loads(out.stdout.strip().splitlines()[-1])
    return str(created["client_id"]), str(created["api_key"])


def run(server: BenchServer, *, seconds: int = 10) -> dict[str, Any]:
    """One round: every server up at once, then Taskgate's single enqueue and the bare JSON endpoint
    back to back (the target is their ratio; measured apart, the machine's drift would be in it),
    the bare insert endpoint, and batch enqueue."""
    cert, key = ensure_dev_certificate(DATA_DIR / "tls")
    results: dict[str, Any] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        db = server.fresh_database("enqueue_taskgate")
        port = free_port()
        env = taskgate_env(db, cert, key, port)
        subprocess.run(
            [sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, capture_output=True, check=True
        )
        api_key = create_client(env)
        tg = subprocess.Popen([sys.executable, "-m", "app", "serve", "--roles", "api"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        processes.append(tg)
        bare_urls = {}
        for variant in ("json", "insert"):
            bare_db = server.fresh_database(f"enqueue_bare_{variant}")
            bare_port = free_port()
            bare = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_app", sqlalchemy_uri(bare_db),
                 str(bare_port), str(cert), str(key)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            processes.append(bare)
            wait_listening(bare, bare_port)
            bare_urls[variant] = f"https://localhost:{bare_port}/{variant}"
        wait_listening(tg, port)
        base = f"https://localhost:{port}"
        # warm-ups: pools, caches, prepared statements
        wrk(f"{base}/api/tasks", key=api_key, seconds=2)
        for url in bare_urls.values():
            wrk(url, seconds=2)
        results["taskgate_single"] = wrk(f"{base}/api/tasks", key=api_key, seconds=seconds)
        results["bare_json"] = wrk(bare_urls["json"], seconds=seconds)
        results["single_vs_bare_json"] = (
            results["taskgate_single"]["requests_per_s"] / results["bare_json"]["requests_per_s"]
        )
        results["bare_insert"] = wrk(bare_urls["insert"], seconds=seconds)
        results["taskgate_batch_tasks_per_s"] = asyncio.run(batch_enqueue(base, api_key, cert))
    finally:
        stop(processes)
    return results


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM each server still running and wait for its graceful exit."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=timeout)


if __name__ == "__main__":
    print(json.dumps(run(BenchServer().start(), seconds=5), indent=2))
