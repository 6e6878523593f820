"""Soak: RATE tasks/s in over HTTPS (batch endpoint) and out through a worker, for MINUTES minutes.

`python -m bench.soak [--minutes 10] [--rate 2000]` prints one JSON line. The split deployment
(`serve --roles api,scheduler` + `worker`) runs with TASK_RETENTION_DAYS set to RETENTION_S, so
finished tasks pass retention a minute after they finish and the scheduler's prune (every tenth
of the retention, at least every 10 s: app/scheduler.py prune_interval_s) deletes them during the
run.

Per minute: the start latency of the tasks created in it (created_at -> started_at, both written
by PostgreSQL, read back through tasks_finished a few seconds behind the completions), the tasks
accepted and completed, the backlog, and the size of the task tables with their indexes and TOAST
(pg_total_relation_size of tasks and task_attempts) at the end of the minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import ssl
from typing import Any

import aiohttp
import asyncpg

from app.scheduler import prune_interval_s
from bench.deployments import Deployment, started
from bench.latency import percentiles
from bench.server import BenchServer

RETENTION_S = 60.0
BATCH = 100  # tasks per request: 20 requests/s at 2,000 tasks/s, so no task waits long for its batch
IN_FLIGHT = 16
# a completion's finished_at is its statement's start; one committed later may carry an earlier
# time, so latencies are read only this far behind the database's clock
READ_LAG_S = 5.0
QUEUE = "soak"

SIZES = """
SELECT pg_total_relation_size('tasks') AS tasks, pg_total_relation_size('task_attempts') AS attempts,
       pg_indexes_size('tasks') + pg_indexes_size('task_attempts') AS indexes,
       (SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'tasks') AS task_rows
"""
FINISHED = """
SELECT EXTRACT(epoch FROM created_at) AS created, EXTRACT(epoch FROM started_at - created_at) AS latency_s,
       finished_at
FROM tasks
WHERE status = 'completed' AND queue_id = $1 AND finished_at > $2 AND finished_at <= $3
"""


async def _soak(running: Deployment, *, minutes: int, rate: float) -> dict[str, Any]:
    conn = await asyncpg.connect(running.db)
    reading = await asyncpg.connect(running.db)  # the latency reader's: it runs beside the sizes
    body = json.dumps({"tasks": [{"queue": QUEUE, "kind": "noop", "payload": {}} for _ in range(BATCH)]})
    headers = {"Authorization": f"Bearer {running.api_key}", "Content-Type": "application/json"}
    context = ssl.create_default_context(cafile=str(running.cafile))
    accepted: list[int] = [0] * (minutes + 1)
    failed = 0
    latencies: list[list[float]] = [[] for _ in range(minutes + 1)]
    completed: list[int] = [0] * (minutes + 1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=IN_FLIGHT)) as http:

        async def send(minute: int) -> None:
            nonlocal failed
            try:
                async with http.post(
                    f"{running.base}/api/tasks/batch", data=body, headers=headers
                ) as response:
                    if response.status == 201:
                        accepted[minute] += BATCH
                    else:
                        failed += 1
            except aiohttp.ClientError:
                failed += 1

        await send(0)  # creates the queue; its tasks are the warm-up, outside every minute
        queue_id = await conn.fetchval(
            "SELECT id FROM queues WHERE client_id = $1 AND name = $2", running.client_id, QUEUE
        )
        db_start = float(await conn.fetchval("SELECT EXTRACT(epoch FROM clock_timestamp())")) + 1.0
        loop = asyncio.get_running_loop()
        start = loop.time() + 1.0
        end = start + minutes * 60
        interval = BATCH / rate

        async def produce() -> None:
            sends: set[asyncio.Task[None]] = set()
            for i in range(math.floor(minutes * 60 / interval)):
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(send(1 + int(i * interval // 60)))
                sends.add(task)
                task.add_done_callback(sends.discard)
            await asyncio.gather(*sends)

        watermark = await conn.fetchval("SELECT now() - interval '1 hour'")

        async def read_latencies(until_idle: bool = False) -> None:
            nonlocal watermark
            while True:
                upto = await reading.fetchval(
                    "SELECT clock_timestamp() - make_interval(secs => $1)", 0.0 if until_idle else READ_LAG_S
                )
                for row in await reading.fetch(FINISHED, queue_id, watermark, upto):
                    minute = 1 + int((float(row["created"]) - db_start) // 60)
                    if 1 <= minute <= minutes:
                        latencies[minute].append(float(row["latency_s"]))
                        completed[minute] += 1
                watermark = upto
                if until_idle:
                    return
                await asyncio.sleep(2.0)

        left = "SELECT count(*) FROM tasks WHERE queue_id = $1 AND status IN ('available', 'running')"
        producer = asyncio.create_task(produce())
        reader = asyncio.create_task(read_latencies())
        per_minute: list[dict[str, Any]] = []
        for minute in range(1, minutes + 1):
            await asyncio.sleep(max(0.0, start + minute * 60 - loop.time()))
            sizes = dict(await conn.fetchrow(SIZES))
            per_minute.append({"minute": minute, "backlog": await conn.fetchval(left, queue_id), **sizes})
        await producer
        drained_by = loop.time() + 60
        while await conn.fetchval(left, queue_id) and loop.time() < drained_by:
            await asyncio.sleep(0.2)
        behind_s = max(0.0, loop.time() - end)  # how long the worker took to catch up after the last batch
        await asyncio.sleep(READ_LAG_S)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await read_latencies(until_idle=True)
    naptime = await conn.fetchval("SHOW autovacuum_naptime")  # the server's round (app/scheduler.py)
    await conn.close()
    await reading.close()
    for row, minute in zip(per_minute, range(1, minutes + 1), strict=True):
        row["accepted"] = accepted[minute]
        row["completed"] = completed[minute]
        row["total_bytes"] = row["tasks"] + row["attempts"]
        if len(latencies[minute]) >= 2:
            row.update({f"start_{k}": v for k, v in percentiles(latencies[minute]).items()})
    first, last = per_minute[0]["total_bytes"], per_minute[-1]["total_bytes"]
    return {
        "minutes": minutes,
        "rate": rate,
        "retention_s": RETENTION_S,
        "prune_interval_s": prune_interval_s(RETENTION_S, 86_400),  # idempotency records: a day
        "autovacuum_naptime": naptime,
        "failed_requests": failed,
        "drained_after_end_s": round(behind_s, 1),
        "size_minute_1_mb": round(first / 2**20, 1),
        "size_end_mb": round(last / 2**20, 1),
        "end_vs_minute_1": last / first,
        "start_p99_ms_worst_minute": max(row.get("start_p99_ms", 0.0) for row in per_minute),
        "per_minute": per_minute,
    }


def run(server: BenchServer, *, minutes: int = 10, rate: float = 2000) -> dict[str, Any]:
    env = {"TASK_RETENTION_DAYS": repr(RETENTION_S / 86_400)}
    with started(server, "split", env=env) as running:
        return asyncio.run(_soak(running, minutes=minutes, rate=rate))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000, help="tasks/s in")
    args = parser.parse_args()
    print(json.dumps(run(BenchServer().start(), minutes=args.minutes, rate=args.rate)))


if __name__ == "__main__":
    main()
