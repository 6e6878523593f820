"""One drain run in this process: `python -m bench.drain SYSTEM DB_URI N [options]` → one JSON line.

The process is the worker process (as a user runs it), so its peak RSS is the worker's.
Timing starts when the backlog is in place and the worker starts; it stops when every task has
finished (Taskgate: its own outcome counter; pgqueuer: drain mode returns; procrastinate:
wait=False returns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from typing import Any

import asyncpg


async def taskgate(uri: str, n: int, *, enqueue: bool, settings: dict[str, Any]) -> dict[str, Any]:
    from app.database import Database
    from app.runtime import Runtime
    from app.settings import load_settings
    from app.src.api import tasks as task_service
    from app.src.api.kinds import load_kinds
    from app.src.api.models.tasks import TaskIn
    from app.src.database import migrations
    from app.src.utils.metrics import TASK_OUTCOMES

    load_kinds()
    await asyncio.to_thread(migrations.upgrade, uri.replace("postgresql://", "postgresql+asyncpg://", 1))
    config = load_settings(
        APP_ENV="prod",
        DB_URI=uri.replace("postgresql://", "postgresql+asyncpg://", 1),
        SECRET_KEYS=["bench"],
        TLS_TERMINATED_UPSTREAM=True,
        ROLES=["worker"],
        LOG_LEVEL="WARNING",
        **settings,
    )
    from app.settings import configure_logging

    configure_logging(config)
    client = uuid.uuid4()
    if enqueue:
        db = Database(config)
        await db.connect()
        items = [TaskIn(kind="noop", payload={})] * 1000
        for _ in range(n // 1000):
            await task_service.enqueue(
                db, client_id=client, items=items, idempotency_key=None, max_queued_tasks=10**9, batch=True
            )
        await db.disconnect()

    def done() -> float:
        return sum(
            sample.value
            for metric in TASK_OUTCOMES.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    runtime = Runtime(config)
    cpu_before = time.process_time()
    started = time.perf_counter()
    await runtime.start()
    while done() < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    drain_cpu = time.process_time() - cpu_before
    await runtime.stop()
    return {"tasks": n, "seconds": elapsed, "drain_cpu_s": drain_cpu}


async def pgqueuer(uri: str, n: int, *, batch_size: int) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

    conn = await asyncpg.connect(uri)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    for start in range(0, n, 1000):
        size = min(1000, n - start)
        await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
    await conn.close()

    conn = await asyncpg.connect(uri)
    manager = QueueManager(Queries(AsyncpgDriver(conn)))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    from pgqueuer import types

    cpu_before = time.process_time()
    started = time.perf_counter()
    await manager.run(batch_size=batch_size, mode=types.QueueExecutionMode.drain)
    elapsed = time.perf_counter() - started
    drain_cpu = time.process_time() - cpu_before
    await conn.close()
    return {"tasks": n, "seconds": elapsed, "drain_cpu_s": drain_cpu}


async def procrastinate_drain(uri: str, n: int, *, concurrency: int) -> dict[str, Any]:
    import procrastinate

    conninfo = _conninfo(uri)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for start in range(0, n, 1000):
            size = min(1000, n - start)
            await noop.batch_defer_async(*({} for _ in range(size)))
        started = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
    return {"tasks": n, "seconds": elapsed}


def _conninfo(uri: str) -> str:
    # postgresql://postgres@/db?host=/socket → libpq keywords
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
    parser.add_argument("--no-enqueue", action="store_true", help="drain what is there (scale-out runs)")
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE for Taskgate")
    args = parser.parse_args()
    if args.system == "taskgate":
        settings = dict(item.split("=", 1) for item in args.setting)
        result = asyncio.run(taskgate(args.uri, args.n, enqueue=not args.no_enqueue, settings=settings))
    elif args.system == "pgqueuer":
        result = asyncio.run(pgqueuer(args.uri, args.n, batch_size=args.batch_size))
    else:
        result = asyncio.run(procrastinate_drain(args.uri, args.n, concurrency=args.concurrency))
    result["tasks_per_s"] = result["tasks"] / result["seconds"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
