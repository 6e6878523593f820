"""Enqueue-to-start latency at a steady rate: `python -m bench.latency SYSTEM DB_URI` → one JSON line.

A producer enqueues one task every 1/rate seconds for `seconds`; each task carries its enqueue
wall time, and the handler records how long ago that was when it starts. Producer and worker
share this process (the same for every system). The first WARMUP_S seconds at the same rate are
not recorded: they pay one-time costs (opening pool connections, preparing statements).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import asyncpg
import uvloop

from bench.drain import conninfo
from bench.server import sqlalchemy_uri


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": cut[49] * 1000,
        "p99_ms": cut[98] * 1000,
        "max_ms": ordered[-1] * 1000,
        "samples": len(ordered),
    }


WARMUP_S = 2.0


async def measured(rate: float, seconds: float, enqueue: Any, latencies: list[float]) -> None:
    """Warm up, forget what the warm-up recorded, then produce for `seconds`."""
    await produce(rate, WARMUP_S, enqueue)
    while len(latencies) < int(rate * WARMUP_S):
        await asyncio.sleep(0.01)
    latencies.clear()
    await produce(rate, seconds, enqueue)
    while len(latencies) < int(rate * seconds):
        await asyncio.sleep(0.05)


async def produce(rate: float, seconds: float, enqueue: Any) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await enqueue(time.time())


async def taskgate(uri: str, rate: float, seconds: float) -> dict[str, Any]:
    from app.runtime import Runtime
    from app.settings import configure_logging, load_settings
    from app.src.api.engine import submit
    from app.src.api.engine.submit import Submitter
    from app.src.api.kinds import load_kinds
    from app.src.api.models.tasks import TaskIn
    from app.src.database import migrations
    from bench import kinds

    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    load_kinds(["bench.kinds"])
    config = load_settings(
        APP_ENV="prod", DB_URI=sqlalchemy_uri(uri), SECRET_KEYS=["zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI="], TLS_TERMINATED_UPSTREAM=True,
        ROLES=["worker"], LOG_LEVEL="WARNING", TASK_KIND_MODULES=["bench.kinds"],
    )  # fmt: skip
    configure_logging(config)
    runtime = Runtime(config)
    await runtime.start()
    submitter = Submitter(uuid.uuid4(), max_queued_tasks=10**9)

    async def enqueue(t0: float) -> None:
        await submit.submit_one(runtime.engine, submitter, TaskIn(kind="bench.stamp", payload={"t0": t0}))

    await measured(rate, seconds, enqueue, kinds.LATENCIES)
    await runtime.stop()
    return percentiles(kinds.LATENCIES)


async def pgqueuer(uri: str, rate: float, seconds: float, batch_size: int) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

    latencies: list[float] = []
    setup = await asyncpg.connect(uri)
    await Queries(AsyncpgDriver(setup)).install()
    await setup.close()
    producer = Queries(AsyncpgDriver(await asyncpg.connect(uri)))
    manager = QueueManager(Queries(AsyncpgDriver(await asyncpg.connect(uri))))

    @manager.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        latencies.append(time.time() - float(job.payload or b"0"))

    worker = asyncio.create_task(manager.run(batch_size=batch_size))
    await asyncio.sleep(1.0)
    await measured(rate, seconds, lambda t0: producer.enqueue("stamp", str(t0).encode()), latencies)
    manager.shutdown.set()
    await worker
    return percentiles(latencies)


async def procrastinate_latency(uri: str, rate: float, seconds: float, concurrency: int) -> dict[str, Any]:
    import procrastinate

    latencies: list[float] = []
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(uri)))

    @app.task(name="stamp")
    async def stamp(t0: float) -> None:
        latencies.append(time.time() - t0)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = asyncio.create_task(
            app.run_worker_async(concurrency=concurrency, install_signal_handlers=False)
        )
        await asyncio.sleep(1.0)
        await measured(rate, seconds, lambda t0: stamp.defer_async(t0=t0), latencies)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return percentiles(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["taskgate", "pgqueuer", "procrastinate"])
    parser.add_argument("uri")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if args.system == "taskgate":
        result = uvloop.run(taskgate(args.uri, args.rate, args.seconds))
    elif args.system == "pgqueuer":
        result = uvloop.run(pgqueuer(args.uri, args.rate, args.seconds, batch_size=10))
    else:
        result = uvloop.run(procrastinate_latency(args.uri, args.rate, args.seconds, concurrency=10))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
