"""Remote-worker drain: an SDK Worker process drains a backlog over HTTPS (batched claim/complete).

One API process (`serve --roles api`: no in-process worker), one SDK worker process running a
no-op remote kind with the SDK imported from sdk/python. n tasks wait in a paused queue; the
queue is resumed and the clock runs until every task is completed.

`python -m bench.remote_drain [n]` prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.src.encryption.certs import ensure_dev_certificate
from bench.http_enqueue import free_port, taskgate_env, wait_listening
from bench.server import DATA_DIR, ROOT, BenchServer

WORKER = """
import os
from taskgate import Client, Worker

tg = Client(os.environ["TG_URL"], api_key=os.environ["TG_KEY"], verify=os.environ["TG_CA"])
worker = Worker(tg, queues=["remote-bench"], concurrency=int(os.environ.get("TG_CONCURRENCY", "400")),
                batch_size=100, name="bench")


@worker.kind("bench.remote_noop")
async def noop(ctx, payload):
    return None
"""


def _profiled(name: str) -> list[str]:
    """REMOTE_DRAIN_PROFILE=dir writes a cProfile of each process there (at its graceful exit)."""
    where = os.environ.get("REMOTE_DRAIN_PROFILE")
    return ["-m", "cProfile", "-o", f"{where}/{name}.prof"] if where else []


def create_client(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "app", "admin", "create-client", "--name", "remote-bench", "--scopes",
         "tasks:write", "tasks:read", "kinds:admin", "tasks:work", "queues:admin",
         "--rate-limit-per-s", "1000000", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return str(json.loads(out.stdout.strip().splitlines()[-1])["api_key"])


async def preload(base: str, key: str, cafile: Path, n: int) -> None:
    context = ssl.create_default_context(cafile=str(cafile))
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base_url=base, connector=aiohttp.TCPConnector(ssl=context)) as session:
        kind = {"payload_schema": {"type": "object"}}
        async with session.put(
            "/api/catalog/kinds/bench.remote_noop", json=kind, headers=headers
        ) as response:
            assert response.status in (200, 201), await response.text()
        async with session.put(
            "/api/queues/remote-bench", json={"paused": True}, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
        body = {"tasks": [{"kind": "bench.remote_noop", "queue": "remote-bench"} for _ in range(1000)]}
        for _ in range(n // 1000):
            async with session.post("/api/tasks/batch", json=body, headers=headers) as response:
                assert response.status == 201, await response.text()


async def resume_and_time(base: str, key: str, cafile: Path, uri: str, n: int) -> float:
    context = ssl.create_default_context(cafile=str(cafile))
    conn = await asyncpg.connect(uri)
    try:
        async with aiohttp.ClientSession(
            base_url=base, connector=aiohttp.TCPConnector(ssl=context)
        ) as session:
            started = time.perf_counter()
            async with session.post(
                "/api/queues/remote-bench/resume", headers={"Authorization": f"Bearer {key}"}
            ) as response:
                assert response.status == 200, await response.text()
        while True:
            done = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'")
            if done >= n:
                return n / (time.perf_counter() - started)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def run(server: BenchServer, n: int = 20_000) -> dict[str, Any]:
    cert, tls_key = ensure_dev_certificate(DATA_DIR / "tls")
    uri = server.fresh_database("remote_drain")
    port = free_port()
    env = taskgate_env(uri, cert, tls_key, port)
    subprocess.run(
        [sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, capture_output=True, check=True
    )
    api_key = create_client(env)
    processes: list[subprocess.Popen[bytes]] = []
    worker_dir = DATA_DIR / "remote_worker"
    worker_dir.mkdir(parents=True, exist_ok=True)
    (worker_dir / "bench_remote_worker.py").write_text(WORKER)
    try:
        api = subprocess.Popen([sys.executable, *_profiled("api"), "-m", "app", "serve", "--roles", "api"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        processes.append(api)
        wait_listening(api, port)
        base = f"https://localhost:{port}"
        asyncio.run(preload(base, api_key, cert, n))
        worker_env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT / 'sdk' / 'python'}{os.pathsep}{worker_dir}",
            "TG_URL": base,
            "TG_KEY": api_key,
            "TG_CA": str(cert),
            "TASKGATE_LOG_LEVEL": "WARNING",
        }
        worker = subprocess.Popen(
            [sys.executable, *_profiled("worker"), "-m", "taskgate", "worker", "bench_remote_worker:worker"],
            cwd=worker_dir, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(worker)
        time.sleep(2)  # imports, kind registration, the first (empty) long-poll
        rate = asyncio.run(resume_and_time(base, api_key, cert, uri.replace("+asyncpg", ""), n))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
    return {"tasks_per_s": rate, "tasks": n}


if __name__ == "__main__":
    print(json.dumps(run(BenchServer().start(), int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)))
