"""Drains through the product's own processes over HTTPS: `serve` with every role and the split
deployment (`serve --roles api,scheduler` + `worker`) against pgqueuer's best batch size, a queue
limited to 50 concurrent tasks against an unlimited one, and a drain with a large history in the
table against an empty one.

One run: a fresh database (or the history's), the processes started as a user starts them, one
warm-up task run to completion (so every process is up and claiming), N `noop` tasks enqueued with
the batch endpoint into a paused queue (or, for backlogs too large for that, inserted by SQL), the
table vacuumed and checkpointed, then `POST /api/queues/{name}/resume`. The clock runs from the
resume request to the last completion, counted in the database: watching through the API would
spend the measured `serve` process's CPU on the watching, and not split's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.src.encryption.certs import ensure_dev_certificate
from bench import preload
from bench.http_enqueue import batch_enqueue, create_client_id, free_port, stop, taskgate_env, wait_listening
from bench.server import DATA_DIR, ROOT, BenchServer, run_json

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


@dataclass
class Deployment:
    """A deployment started as a user starts it, with the client the benchmark acts as."""

    base: str
    api_key: str
    client_id: uuid.UUID
    cafile: Path
    db: str
    processes: list[subprocess.Popen[bytes]]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


@contextlib.contextmanager
def started(
    server: BenchServer, deployment: str, *, database: str | None = None, env: dict[str, str] | None = None
) -> Iterator[Deployment]:
    """`deployment`'s processes on a migrated database (a fresh one unless `database` is given),
    listening over HTTPS; stopped (SIGTERM, graceful) on the way out. `env` adds settings."""
    cert, key = ensure_dev_certificate(DATA_DIR / "tls")
    db = database or server.fresh_database(f"deploy_{deployment}")
    port = free_port()
    env = {**taskgate_env(db, cert, key, port), **(env or {})}
    subprocess.run(
        [sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, capture_output=True, check=True
    )
    client_id, api_key = create_client_id(env, "queues:admin")
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
            yield Deployment(f"https://localhost:{port}", api_key, uuid.UUID(client_id), cert, db, processes)
        except Exception:
            errors.seek(0)
            sys.stderr.write(errors.read()[-3000:].decode(errors="replace"))
            raise
        finally:
            stop(processes)


def drain(
    server: BenchServer,
    deployment: str,
    n: int,
    *,
    max_concurrency: int | None = None,
    load: str = "https",
    database: str | None = None,
) -> dict[str, Any]:
    """One drain of n tasks through `deployment`: tasks/s, the CPU each process spent on it, and each
    process's peak RSS. `load`: "https" enqueues with the batch endpoint, "sql" inserts server-side
    (for backlogs too large to enqueue in reasonable time); `database`: an existing one (history)."""
    if load == "https" and n % 1000:
        raise ValueError(f"{n} tasks: the batch endpoint is fed 1,000 at a time")
    with started(server, deployment, database=database) as running:
        return asyncio.run(_timed_drain(running, n, max_concurrency=max_concurrency, load=load))


async def _timed_drain(
    running: Deployment, n: int, *, max_concurrency: int | None, load: str
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {running.api_key}"}
    context = ssl.create_default_context(cafile=str(running.cafile))
    pids = running.pids
    conn = await asyncpg.connect(running.db)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), headers=headers
        ) as http:

            async def call(method: str, path: str, body: Any = None, status: int = 200) -> None:
                async with http.request(method, f"{running.base}{path}", json=body) as response:
                    assert response.status == status, await response.text()

            await call("POST", "/api/tasks", {"kind": "noop"}, 201)
            while not await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE client_id = $1 AND status = 'completed'", running.client_id
            ):
                await asyncio.sleep(0.05)
            await call("PUT", f"/api/queues/{QUEUE}", {"paused": True, "max_concurrency": max_concurrency})
            queue_id = await conn.fetchval(
                "SELECT id FROM queues WHERE client_id = $1 AND name = $2", running.client_id, QUEUE
            )
            if load == "sql":
                await preload.tasks(conn, client=running.client_id, queue_id=queue_id, n=n)
            else:
                await batch_enqueue(
                    running.base, running.api_key, running.cafile, batches=n // 1000, size=1000, queue=QUEUE
                )
            await conn.execute("VACUUM ANALYZE tasks")
            await conn.execute("CHECKPOINT")
            # what is left rather than what is done: tasks_queue_status reads only this queue's
            # unfinished rows, whatever history the table holds
            left = "SELECT count(*) FROM tasks WHERE queue_id = $1 AND status IN ('available', 'running')"
            profilers = _profile(pids)
            cpu_before = [cpu_s(pid) for pid in pids]
            started_at = time.perf_counter()
            await call("POST", f"/api/queues/{QUEUE}/resume")
            done, stalled_s, last_change = 0, 0.0, started_at
            while done < n:
                await asyncio.sleep(0.02)
                now, seen = time.perf_counter(), n - await conn.fetchval(left, queue_id)
                if seen != done:
                    done, last_change = seen, now
                stalled_s = max(stalled_s, now - last_change)
            elapsed = time.perf_counter() - started_at
            cpu = [cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            peak_rss_mb = [peak_rss_kb(pid) / 1024 for pid in pids]
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
        "peak_rss_mb": [round(m, 1) for m in peak_rss_mb],  # per process, in DEPLOYMENTS order
        "window": [round(time.time() - elapsed, 3), round(time.time(), 3)],
    }


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident set so far (/proc/PID/status VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


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


def rotated(
    runs: int, measures: dict[str, Callable[[], dict[str, Any]]], *, label: str = ""
) -> dict[str, list[Any]]:
    """Every measure once per round, the order rotated from round to round, so the machine's drift
    over minutes lands on all of them; {name: [one result per round]}."""
    rounds: dict[str, list[Any]] = {name: [] for name in measures}
    names = list(measures)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            rounds[name].append(measures[name]())
        print(
            f"  {label} round {i + 1}: "
            + ", ".join(f"{name} {rounds[name][-1]['tasks_per_s']:,.0f}/s" for name in names),
            file=sys.stderr,
            flush=True,
        )
    return rounds


def interleaved(
    runs: int, a: Callable[[], dict[str, Any]], b: Callable[[], dict[str, Any]], *, label: str = ""
) -> dict[str, list[Any]]:
    """A and B round by round, alternating which goes first; the ratio A/B is taken per round."""
    rounds = rotated(runs, {"a": a, "b": b}, label=label)
    rounds["ratio"] = [
        x["tasks_per_s"] / y["tasks_per_s"] for x, y in zip(rounds["a"], rounds["b"], strict=True)
    ]
    return rounds


def pgqueuer_drain(server: BenchServer, n: int, batch_size: int) -> dict[str, Any]:
    """pgqueuer's drain of n tasks in a worker process of its own (bench/drain.py)."""
    uri = server.fresh_database("drain_pgqueuer")
    return run_json(["-m", "bench.drain", "pgqueuer", uri, str(n), "--batch-size", str(batch_size)])


def versus_pgqueuer(server: BenchServer, runs: int, n: int, batch_sizes: list[int]) -> dict[str, Any]:
    """`serve`, split and pgqueuer at each batch size, rotated round by round; per round, pgqueuer's
    best batch size is its figure, and serve/best, split/best and serve/split are taken."""
    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "serve": lambda: drain(server, "serve", n),
        "split": lambda: drain(server, "split", n),
    }
    for size in batch_sizes:
        measures[f"pgqueuer_batch{size}"] = lambda size=size: pgqueuer_drain(server, n, size)  # type: ignore[misc]
    rounds = rotated(runs, measures, label="serve/split/pgqueuer")
    peers = [f"pgqueuer_batch{size}" for size in batch_sizes]
    best = [max(rounds[p][i]["tasks_per_s"] for p in peers) for i in range(runs)]
    rounds["pgqueuer_best"] = [{"tasks_per_s": b} for b in best]
    rounds["pgqueuer_best_batch"] = [
        max(batch_sizes, key=lambda size, i=i: rounds[f"pgqueuer_batch{size}"][i]["tasks_per_s"])  # type: ignore[misc]
        for i in range(runs)
    ]
    for name in ("serve", "split"):
        rounds[f"{name}_vs_pgqueuer"] = [
            r["tasks_per_s"] / b for r, b in zip(rounds[name], best, strict=True)
        ]
    rounds["serve_vs_split"] = [
        a["tasks_per_s"] / b["tasks_per_s"] for a, b in zip(rounds["serve"], rounds["split"], strict=True)
    ]
    return rounds


def history_vs_empty(server: BenchServer, runs: int, n: int, history: int) -> dict[str, list[Any]]:
    """The split deployment draining n tasks with `history` finished tasks (and their attempts) in
    the table, against a fresh database; the history is loaded once and serves every round (each
    round leaves its n completions in it too)."""
    uri = server.fresh_database("deploy_history")
    try:
        asyncio.run(preload.history(uri, history))
        return interleaved(
            runs,
            lambda: drain(server, "split", n, database=uri),
            lambda: drain(server, "split", n),
            label="history/empty",
        )
    finally:
        server.drop_database("deploy_history")  # gigabytes at the full size


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
