"""Maintenance prunes a key's rate window only once every start in it is outside its queue's window
(a minute, or 1/key_rate_limit_per_s seconds when that is longer): pruning earlier would let the
key start again before its window allows."""

import uuid

import asyncpg

from app.src.database import maintenance
from tests.conftest import driver_uri


async def _queue(conn: asyncpg.Connection, name: str, rate: float) -> int:
    client = uuid.uuid4()
    await conn.execute("INSERT INTO api_clients (id, name, scopes) VALUES ($1, $2, '{}')", client, name)
    queue_id: int = await conn.fetchval(
        "INSERT INTO queues (client_id, name, key_rate_limit_per_s) VALUES ($1, $2, $3) RETURNING id",
        client,
        name,
        rate,
    )
    return queue_id


async def test_a_window_longer_than_a_minute_outlives_the_prune(clean_database: str) -> None:
    conn = await asyncpg.connect(driver_uri(clean_database))
    try:
        slow = await _queue(conn, "slow", 0.001)  # one start per key in any 1,000 s
        fast = await _queue(conn, "fast", 5)  # 5 per key in any second
        five_minutes_ago = "now() - interval '5 minutes'"
        await conn.execute(
            f"""INSERT INTO task_key_starts (queue_id, key, starts, updated_at)
                VALUES ($1, 'k', ARRAY[{five_minutes_ago}], {five_minutes_ago}),
                       ($2, 'k', ARRAY[{five_minutes_ago}], {five_minutes_ago}),
                       ($2, 'recent', ARRAY[now()], now())""",
            slow,
            fast,
        )
        pruned = await maintenance.prune_flow_state(conn, older_than_s=86_400)
        left = await conn.fetch("SELECT queue_id, key FROM task_key_starts ORDER BY queue_id, key")
    finally:
        await conn.close()
    assert pruned == 1
    assert [(row["queue_id"], row["key"]) for row in left] == [(slow, "k"), (fast, "recent")]
