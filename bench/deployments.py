"""Drains through the product's own processes over HTTPS: `serve` with every role against the split
deployment (`serve --roles api,scheduler` + `worker`), and a queue limited to 50 concurrent tasks
against an unlimited one.

One run: a fresh database, the processes started as a user starts them, one warm-up task run to
completion (so every process is up and claiming), N `noop` tasks enqueued with the batch endpoint
into a paused queue, the table vacuumed and checkpointed, then `POST /api/queues/{name}/resume`.
The clock runs from the resume request to the last completion, counted in the database: watching
through the API would spend the measured `serve` process's CPU on the watching, and not split's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.src.encryption.certs import ensure_dev_certificate
from bench.http_enqueue import batch_enqueue, create_client, free_port, stop, taskgate_env, wait_listening
from bench.server import DATA_DIR, ROOT, BenchServer

DEPLOYMENTS: dict[str, list[list[str]]] = {
    "serve": [["serve"]],  # every role in one process: what `make run` and a one-box deployment use
    "split": [["serve", "--roles", "api,scheduler"], ["worker"]],
}
QUEUE = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def drain(
    server: BenchServer, deployment: str, n: int, *, max_concurrency: int | None = None
) -> dict[str, Any]:
    """One drain of n tasks through `deployment`: tasks/s, and the CPU each process spent on it."""
    cert, key = ensure_dev_certificate(DATA_DIR / "tls")
    db = server.fresh_database(f"deploy_{deployment}")
    port = free_port()
    env = taskgate_env(db, cert, key, port)
    subprocess.run(
        [sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, capture_output=True, check=True
    )
    api_key = create_client(env, "queues:admin")
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryFile() as errors:
        try:
            for command in DEPLOYMENTS[deployment]:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "app", *command],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=errors,
                    )
                )
            wait_listening(processes[0], port)
            result = asyncio.run(
                _timed_drain(
                    f"https://localhost:{port}",
                    api_key,
                    cert,
                    db,
                    n,
                    max_concurrency=max_concurrency,
                    pids=[p.pid for p in processes],
                )
            )
        except Exception:
            errors.seek(0)
            sys.stderr.write(errors.read()[-3000:].decode(errors="replace"))
            raise
        finally:
            stop(processes)
    return result


async def _timed_drain(
    base: str, api_key: str, cafile: Path, db: str, n: int, *, max_concurrency: int | None, pids: list[int]
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"}
    context = ssl.create_default_context(cafile=str(cafile))
    conn = await asyncpg.connect(db)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), headers=headers
        ) as http:

            async def call(method: str, path: str, body: Any = None, status: int = 200) -> None:
                async with http.request(method, f"{base}{path}", json=body) as response:
                    assert response.status == status, await response.text()

            await call("POST", "/api/tasks", {"kind": "noop"}, 201)
            while not await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'"):
                await asyncio.sleep(0.05)
            await call("PUT", f"/api/queues/{QUEUE}", {"paused": True, "max_concurrency": max_concurrency})
            await batch_enqueue(base, api_key, cafile, batches=n // 1000, size=1000, queue=QUEUE)
            await conn.execute("VACUUM ANALYZE tasks")
            await conn.execute("CHECKPOINT")
            count = "SELECT count(*) FROM tasks t JOIN queues q ON q.id = t.queue_id WHERE q.name = $1 AND t.status = 'completed'"
            profilers = _profile(pids)
            cpu_before = [cpu_s(pid) for pid in pids]
            started = time.perf_counter()
            await call("POST", f"/api/queues/{QUEUE}/resume")
            done, stalled_s, last_change = 0, 0.0, started
            while done < n:
                await asyncio.sleep(0.02)
                now, seen = time.perf_counter(), await conn.fetchval(count, QUEUE)
                if seen != done:
                    done, last_change = seen, now
                stalled_s = max(stalled_s, now - last_change)
            elapsed = time.perf_counter() - started
            cpu = [cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
    finally:
        await conn.close()
    return {
        "tasks_per_s": n / elapsed,
        "seconds": elapsed,
        "cpu_s": [round(c, 2) for c in cpu],
        "cpu_us_per_task": sum(cpu) / n * 1e6,  # every process of the deployment, as the machine pays
        "longest_stall_s": round(stalled_s, 3),  # the longest time no task completed
        "window": [round(time.time() - elapsed, 3), round(time.time(), 3)],
    }


def _profile(pids: list[int]) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PROFILE=DIR: py-spy samples each process during the drain (collapsed stacks)."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    profilers = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                f"{out}/{stamp}-{pid}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(1)  # attached before the clock starts
    return profilers


def interleaved(
    runs: int, a: Callable[[], dict[str, Any]], b: Callable[[], dict[str, Any]], *, label: str = ""
) -> dict[str, list[Any]]:
    """A and B round by round, alternating which goes first, so the machine's drift over minutes
    lands on both; the ratio A/B is taken per round."""
    rounds: dict[str, list[Any]] = {"a": [], "b": [], "ratio": []}
    for i in range(runs):
        order = [("a", a), ("b", b)] if i % 2 == 0 else [("b", b), ("a", a)]
        got = {name: measure() for name, measure in order}
        rounds["a"].append(got["a"])
        rounds["b"].append(got["b"])
        rounds["ratio"].append(got["a"]["tasks_per_s"] / got["b"]["tasks_per_s"])
        print(
            f"  {label} round {i + 1}: a {got['a']['tasks_per_s']:,.0f}/s cpu {got['a']['cpu_s']} "
            f"stall {got['a']['longest_stall_s']}s, b {got['b']['tasks_per_s']:,.0f}/s cpu {got['b']['cpu_s']} "
            f"stall {got['b']['longest_stall_s']}s, a/b {rounds['ratio'][-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return rounds


def serve_vs_split(server: BenchServer, runs: int, n: int) -> dict[str, list[Any]]:
    return interleaved(
        runs, lambda: drain(server, "serve", n), lambda: drain(server, "split", n), label="serve/split"
    )


def limited_vs_unlimited(server: BenchServer, runs: int, n: int) -> dict[str, list[Any]]:
    return interleaved(
        runs,
        lambda: drain(server, "serve", n, max_concurrency=50),
        lambda: drain(server, "serve", n),
        label="limited/unlimited",
    )


if __name__ == "__main__":
    import json

    which = sys.argv[1] if len(sys.argv) > 1 else "serve"
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(drain(BenchServer().start(), which, tasks, max_concurrency=limit)))
