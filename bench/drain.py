"""One drain run in this process: `python -m bench.drain SYSTEM DB_URI N [options]` → one JSON line.

This process is the worker process, as a user runs it (default settings), so its peak RSS is the
worker's. The backlog is loaded first (Taskgate: server-side SQL; the peers: their own enqueue
API); timing starts when the worker starts and stops when every task has finished (Taskgate: its
outcome counter, or the database with --watch-db when several processes share the work;
pgqueuer: drain mode returns; procrastinate: wait=False returns).

With --barrier, Taskgate tasks are loaded into a paused queue and the worker prints "ready"; the
caller resumes the queue once every worker is up (scale-out runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

import asyncpg
import uvloop

from bench.server import sqlalchemy_uri


async def prepare_taskgate(
    uri: str, n: int, *, completed: int = 0, scheduled: int = 0, paused: bool = False
) -> None:
    from app.src.database import migrations
    from bench import preload

    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    conn = await asyncpg.connect(uri)
    try:
        client, queue_id = await preload.queue(conn, paused=paused)
        if completed:
            await preload.tasks(conn, client=client, queue_id=queue_id, n=completed, status="completed")
        if scheduled:
            await preload.tasks(
                conn,
                client=client,
                queue_id=queue_id,
                n=scheduled,
                status="scheduled",
                run_at="now() + interval '1 day'",
            )
        await preload.tasks(conn, client=client, queue_id=queue_id, n=n)
        # the clock starts on a settled table: vacuumed, analyzed and checkpointed, so a drain does
        # not share the CPU and disk with the aftermath of the bulk load (autovacuum, a checkpoint)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def taskgate(
    uri: str, n: int, *, watch_db: bool, barrier: bool, settings: dict[str, Any]
) -> dict[str, Any]:
    from app.runtime import Runtime
    from app.settings import configure_logging, load_settings
    from app.src.api.kinds import load_kinds
    from app.src.utils.metrics import TASK_OUTCOMES

    load_kinds()
    config = load_settings(
        APP_ENV="prod",
        DB_URI=sqlalchemy_uri(uri),
        SECRET_KEYS=["zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI="],
        TLS_TERMINATED_UPSTREAM=True,
        ROLES=["worker"],
        LOG_LEVEL="WARNING",
        **settings,
    )
    configure_logging(config)

    def finished_here() -> float:
        return sum(s.value for m in TASK_OUTCOMES.collect() for s in m.samples if s.name.endswith("_total"))

    watcher = await asyncpg.connect(uri) if watch_db else None

    async def finished() -> float:
        if watcher is None:
            return finished_here()
        return float(
            await watcher.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed' AND attempts > 0")
        )

    runtime = Runtime(config)
    await runtime.start()
    if barrier:
        print("ready", flush=True)
        while await watcher.fetchval("SELECT paused FROM queues WHERE name = 'default'"):  # type: ignore[union-attr]
            await asyncio.sleep(0.005)
    cpu_before = time.process_time()
    started = time.perf_counter()
    while await finished() < n:
        await asyncio.sleep(0.002 if watcher is None else 0.02)
    elapsed = time.perf_counter() - started
    drain_cpu = time.process_time() - cpu_before
    await runtime.stop()
    if watcher is not None:
        await watcher.close()
    return {"tasks": n, "seconds": elapsed, "drain_cpu_s": drain_cpu, "completed_here": finished_here()}


async def pgqueuer(uri: str, n: int, *, batch_size: int) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager, types

    conn = await asyncpg.connect(uri)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    for start in range(0, n, 1000):
        size = min(1000, n - start)
        await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
    # settled as Taskgate's table is before its clock starts (bench/deployments.py)
    await conn.execute("VACUUM ANALYZE pgqueuer")
    await conn.execute("CHECKPOINT")
    await conn.close()

    conn = await asyncpg.connect(uri)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    cpu_before = time.process_time()
    started = time.perf_counter()
    await manager.run(batch_size=batch_size, mode=types.QueueExecutionMode.drain)
    elapsed = time.perf_counter() - started
    drain_cpu = time.process_time() - cpu_before
    await conn.close()
    return {"tasks": n, "seconds": elapsed, "drain_cpu_s": drain_cpu}


async def procrastinate_drain(uri: str, n: int, *, concurrency: int) -> dict[str, Any]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(uri)))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for start in range(0, n, 1000):
            await noop.batch_defer_async(*({} for _ in range(min(1000, n - start))))
        cpu_before = time.process_time()
        started = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        drain_cpu = time.process_time() - cpu_before
    return {"tasks": n, "seconds": elapsed, "drain_cpu_s": drain_cpu}


def conninfo(uri: str) -> str:
    """postgresql://user@/db?host=/socket as libpq keywords (psycopg)."""
    rest = uri.split("://", 1)[1]
    user, rest = rest.split("@", 1)
    database, host = rest.split("?host=", 1)
    return f"host={host} dbname={database.strip('/')} user={user}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["taskgate", "pgqueuer", "procrastinate"])
    parser.add_argument("uri")
    parser.add_argument("n", type=int)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--prepare", action="store_true", help="Taskgate: load the backlog first")
    parser.add_argument("--completed", type=int, default=0, help="finished tasks already in the table")
    parser.add_argument("--scheduled", type=int, default=0, help="future tasks already in the table")
    parser.add_argument("--watch-db", action="store_true", help="count completions in the database")
    parser.add_argument("--barrier", action="store_true", help="wait for the default queue to be resumed")
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE for Taskgate")
    args = parser.parse_args()
    if args.system == "taskgate":
        if args.prepare:
            uvloop.run(prepare_taskgate(args.uri, args.n, completed=args.completed, scheduled=args.scheduled))
        settings = dict(item.split("=", 1) for item in args.setting)
        result = uvloop.run(
            taskgate(
                args.uri,
                args.n,
                watch_db=args.watch_db or args.barrier,
                barrier=args.barrier,
                settings=settings,
            )
        )
    elif args.system == "pgqueuer":
        result = uvloop.run(pgqueuer(args.uri, args.n, batch_size=args.batch_size))
    else:
        result = uvloop.run(procrastinate_drain(args.uri, args.n, concurrency=args.concurrency))
    result["tasks_per_s"] = result["tasks"] / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
