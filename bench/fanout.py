"""Fan-out/fan-in: `python -m bench.fanout DB_URI N` → one JSON line.

One parent task spawns N `noop` children (created in its suspension's transaction, through the
engine's submit rules) and gathers them: the last child's completion makes the parent available,
it re-runs, gathers N results and completes. A worker process with default settings runs all of
it; the clock runs from the parent's enqueue to its completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import uvloop

from bench.server import sqlalchemy_uri


async def fan_out(uri: str, n: int) -> dict[str, Any]:
    from app.runtime import Runtime
    from app.settings import configure_logging, load_settings
    from app.src.api.kinds import load_kinds
    from app.src.database import migrations
    from bench import preload

    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    load_kinds(["bench.kinds"])
    config = load_settings(
        APP_ENV="prod",
        DB_URI=sqlalchemy_uri(uri),
        SECRET_KEYS=["zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI="],
        TLS_TERMINATED_UPSTREAM=True,
        ROLES=["worker"],
        LOG_LEVEL="WARNING",
        TASK_KIND_MODULES=["bench.kinds"],
        CLIENT_MAX_QUEUED_TASKS=10 * n + 1000,
    )
    configure_logging(config)
    conn = await asyncpg.connect(uri)
    runtime = Runtime(config)
    await runtime.start()
    try:
        client, queue_id = await preload.queue(conn)
        parent = uuid.uuid4()
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts, run_at) "
            "VALUES ($1, $2, $3, 'default', 'bench.fanout', $4::jsonb, 'available', 3, now())",
            parent,
            client,
            queue_id,
            json.dumps({"children": n}),
        )
        await conn.execute(f"NOTIFY taskgate_available, '{queue_id}'")
        spawned_s = children_done_s = None
        while True:
            status, result, open_ = await conn.fetchrow(
                "SELECT status, result, children_open FROM tasks WHERE id = $1", parent
            )
            if spawned_s is None and open_ > 0:
                spawned_s = time.perf_counter() - started
            if spawned_s is not None and children_done_s is None and open_ == 0:
                children_done_s = time.perf_counter() - started
            if status in ("completed", "discarded", "cancelled"):
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        await runtime.stop()
        await conn.close()
    gathered = json.loads(result)["gathered"] if status == "completed" else 0
    return {
        "children": n,
        "status": status,
        "gathered": gathered,
        "seconds": elapsed,
        "spawned_s": spawned_s,  # the children exist (the parent's suspension committed)
        "children_done_s": children_done_s,  # the last child finished
        "tasks_per_s": (n + 1) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("n", type=int)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(fan_out(args.uri, args.n))), flush=True)


if __name__ == "__main__":
    main()
