"""Flow control by key under load: the keyed claim's cost and its fairness (part of `make bench`).

- claim cost: the drain of 20,000 `noop` tasks spread over 10,000 keys (two each) in a queue with
  key_concurrency 10, against the same drain in a keyless queue, by one worker process with
  default settings; runs interleaved, the ratio is the median of the per-round ratios.
- fairness: one key holds 10,000 tasks and 50 other keys one each, all in the table before the
  worker starts; the figure is the longest start delay of the 50 small keys (from the first start)
  and how many of the big key's tasks started by then (in the same claim or before).

`python -m bench.flow [--quick]` prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

import asyncpg

from bench.server import BenchServer, run_json, sqlalchemy_uri

KEYS = 10_000
KEY_CONCURRENCY = 10


async def prepare(uri: str, n: int, *, keys: int | None, key_concurrency: int | None, big: int = 0) -> None:
    from app.src.database import migrations
    from bench import preload

    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    conn = await asyncpg.connect(uri)
    try:
        client, queue_id = await preload.queue(conn)
        await conn.execute("UPDATE queues SET key_concurrency = $2 WHERE id = $1", queue_id, key_concurrency)
        if big:
            await preload.tasks(conn, client=client, queue_id=queue_id, n=big, key="'big'")
        key = "NULL" if keys is None else f"'k' || lpad((i % {keys})::text, 5, '0')"
        await preload.tasks(conn, client=client, queue_id=queue_id, n=n, key=key)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def drain(server: BenchServer, name: str, n: int, **prepared: Any) -> dict[str, Any]:
    uri = server.fresh_database(name)
    asyncio.run(prepare(uri, n, **prepared))
    total = n + prepared.get("big", 0)
    return run_json(["-m", "bench.drain", "taskgate", uri, str(total)]) | {"uri": uri}


def keyed_vs_keyless(server: BenchServer, runs: int, n: int) -> dict[str, list[float]]:
    keys = min(KEYS, n // 2)
    rounds: dict[str, list[float]] = {"keyed": [], "keyless": [], "ratio": []}
    for _ in range(runs):
        keyed = drain(server, "flow_keyed", n, keys=keys, key_concurrency=KEY_CONCURRENCY)["tasks_per_s"]
        keyless = drain(server, "flow_keyless", n, keys=None, key_concurrency=None)["tasks_per_s"]
        rounds["keyed"].append(keyed)
        rounds["keyless"].append(keyless)
        rounds["ratio"].append(keyed / keyless)
    return rounds


def fairness(server: BenchServer, big: int) -> dict[str, float]:
    result = drain(server, "flow_fair", 50, keys=50, key_concurrency=big, big=big)

    async def figures() -> dict[str, float]:
        conn = await asyncpg.connect(result["uri"])
        try:
            row = await conn.fetchrow(
                """
                WITH first AS (SELECT min(started_at) AS at FROM tasks),
                     small AS (SELECT max(started_at) AS last FROM tasks WHERE concurrency_key <> 'big')
                SELECT EXTRACT(epoch FROM (SELECT last FROM small) - (SELECT at FROM first)) * 1000 AS delay_ms,
                       (SELECT count(*) FROM tasks WHERE concurrency_key = 'big'
                        AND started_at <= (SELECT last FROM small)) AS big_before
                """
            )
        finally:
            await conn.close()
        return {
            "small_keys_max_start_delay_ms": float(row["delay_ms"]),
            "big_key_started_before": float(row["big_before"]),
        }

    return await_figures(figures) | {"tasks_per_s": result["tasks_per_s"]}


def await_figures(make: Any) -> dict[str, float]:
    out: dict[str, float] = asyncio.run(make())
    return out


def run(server: BenchServer, runs: int, *, quick: bool) -> dict[str, Any]:
    n = 5_000 if quick else 20_000
    rounds = keyed_vs_keyless(server, runs, n)
    fair = [fairness(server, 2_000 if quick else 10_000) for _ in range(runs)]

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": len(values),
        }

    return {
        "keys": min(KEYS, n // 2),
        "keyed": summary(rounds["keyed"]),
        "keyless": summary(rounds["keyless"]),
        "ratio": summary(rounds["ratio"]),
        "fairness_delay_ms": summary([f["small_keys_max_start_delay_ms"] for f in fair]),
        "fairness_big_before": summary([f["big_key_started_before"] for f in fair]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(BenchServer().start(), args.runs, quick=args.quick)))


if __name__ == "__main__":
    main()
