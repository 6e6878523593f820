"""Limited queues under racing claims: many workers claiming the same queue at the same instant
never run more than its max_concurrency, nor spend more than its token bucket holds, nor run more
of one key than its key_concurrency or its key rate window allows."""

import asyncio
import uuid

import asyncpg

from app.src.database import tasks as task_store
from tests.conftest import driver_uri

CLAIMERS = 12


async def _queue_with_tasks(conn: asyncpg.Connection, n: int, *, keys: int = 0, **limits: float) -> int:
    """A queue with these limits and n available tasks; with `keys`, spread over that many keys."""
    client = uuid.uuid4()
    await conn.execute("INSERT INTO api_clients (id, name, scopes) VALUES ($1, 'race', '{}')", client)
    columns = ", ".join(limits)
    values = ", ".join(f"${i + 3}" for i in range(len(limits)))
    queue_id: int = await conn.fetchval(
        f"INSERT INTO queues (client_id, name, {columns}) VALUES ($1, $2, {values}) RETURNING id",
        client,
        "narrow",
        *limits.values(),
    )
    await conn.execute(
        """INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts, run_at,
                              concurrency_key)
           SELECT gen_random_uuid(), $1, $2, 'narrow', 'noop', '{}', 'available', 3, now(),
                  CASE WHEN $4 > 0 THEN 'key-' || (i % $4) END
           FROM generate_series(1, $3) i""",
        client,
        queue_id,
        n,
        keys,
    )
    return queue_id


async def _race(uri: str, queue_id: int, *, rounds: int, keyed: bool = False) -> list[int]:
    """CLAIMERS connections, each claiming up to 10 at once, `rounds` times; tasks claimed per round.

    In the first round the queue row is held locked until every claim has read its snapshot, so
    all of them count the same running tasks: the worst race there is.
    """
    conns = [await asyncpg.connect(uri) for _ in range(CLAIMERS)]
    blocker = await asyncpg.connect(uri)
    try:
        per_round = []
        for i in range(rounds):
            claims = [
                task_store.claim_limited(
                    c, queue_id=queue_id, keyed=keyed, limit=10, lease_s=30, worker_id=uuid.uuid4()
                )
                for c in conns
            ]
            if i == 0:
                async with blocker.transaction():
                    await blocker.execute("SELECT 1 FROM queues WHERE id = $1 FOR UPDATE", queue_id)
                    racing = [asyncio.ensure_future(claim) for claim in claims]
                    await asyncio.sleep(0.5)
                got = await asyncio.gather(*racing)
            else:
                got = await asyncio.gather(*claims)
            per_round.append(sum(len(g) for g in got))
        return per_round
    finally:
        for c in [*conns, blocker]:
            await c.close()


async def test_racing_claims_never_exceed_max_concurrency(clean_database: str) -> None:
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    try:
        queue_id = await _queue_with_tasks(conn, 500, max_concurrency=10)
        claimed = await _race(uri, queue_id, rounds=5)
        running = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE queue_id = $1 AND status = 'running'", queue_id
        )
    finally:
        await conn.close()
    assert running == 10  # the limit, taken in full by the first round
    assert claimed == [10, 0, 0, 0, 0]


async def test_racing_claims_spend_the_token_bucket_once(clean_database: str) -> None:
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    try:
        # a full bucket of 4 tokens at a rate of 0.01/s: nothing more accrues during the test
        queue_id = await _queue_with_tasks(conn, 500, rate_limit_per_s=0.01)
        await conn.execute(
            "UPDATE queues SET rate_tokens = 4, rate_updated_at = now() WHERE id = $1", queue_id
        )
        claimed = await _race(uri, queue_id, rounds=3)
    finally:
        await conn.close()
    assert sum(claimed) == 1  # the bucket holds at most max(rate, 1) = 1 token


async def test_racing_keyed_claims_never_exceed_key_concurrency(clean_database: str) -> None:
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    try:
        queue_id = await _queue_with_tasks(conn, 500, keys=5, key_concurrency=2)
        claimed = await _race(uri, queue_id, rounds=4, keyed=True)
        per_key = await conn.fetch(
            """SELECT concurrency_key, count(*) AS n FROM tasks
               WHERE queue_id = $1 AND status = 'running' GROUP BY concurrency_key""",
            queue_id,
        )
    finally:
        await conn.close()
    assert sorted(row["n"] for row in per_key) == [2, 2, 2, 2, 2]  # every key full, none over
    assert claimed == [10, 0, 0, 0]


async def test_racing_keyed_claims_spend_each_key_window_once(clean_database: str) -> None:
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    try:
        # one start per key in any 10 s (a rate of 0.1/s), 4 keys: the race starts 4 in all
        queue_id = await _queue_with_tasks(conn, 400, keys=4, key_rate_limit_per_s=0.1)
        claimed = await _race(uri, queue_id, rounds=2, keyed=True)
        per_key = await conn.fetch(
            """SELECT concurrency_key, count(*) AS n FROM tasks
               WHERE queue_id = $1 AND status = 'running' GROUP BY concurrency_key""",
            queue_id,
        )
    finally:
        await conn.close()
    assert sorted(row["n"] for row in per_key) == [1, 1, 1, 1]
    assert claimed == [4, 0]


async def _waiting_on_a_lock(conn: asyncpg.Connection, n: int) -> None:
    """Until n claim statements wait on a lock (the blocker's, on the queue row)."""
    for _ in range(500):
        waiting = await conn.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND datname = current_database()"""
        )
        if waiting >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} claims never waited on the queue row")


async def test_a_keyed_claim_from_an_older_snapshot_claims_nothing(clean_database: str) -> None:
    """Two claims that saw different tasks: X read before urgent tasks arrived, Y after (so they
    pick different tasks of each key), and both wait on the queue row. Written together they would
    run three tasks of a key whose limit is two; the one written second claims again instead."""
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    x_conn, y_conn, blocker = [await asyncpg.connect(uri) for _ in range(3)]
    try:
        queue_id = await _queue_with_tasks(conn, 30, keys=3, key_concurrency=2)

        def claim(c: asyncpg.Connection) -> asyncio.Future[list[task_store.ClaimedTask]]:
            return asyncio.ensure_future(
                task_store.claim_limited(
                    c, queue_id=queue_id, keyed=True, limit=10, lease_s=30, worker_id=uuid.uuid4()
                )
            )

        async with blocker.transaction():
            # the lock a claim's write of the queue row takes, which still lets tasks reference the row
            await blocker.execute("SELECT 1 FROM queues WHERE id = $1 FOR NO KEY UPDATE", queue_id)
            x = claim(x_conn)
            await _waiting_on_a_lock(conn, 1)
            await conn.execute(
                """INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, max_attempts,
                                      run_at, priority, concurrency_key)
                   SELECT gen_random_uuid(), client_id, id, name, 'noop', '{}', 'available', 3, now(), 0,
                          'key-' || k
                   FROM queues, generate_series(0, 2) k WHERE id = $1""",
                queue_id,
            )
            y = claim(y_conn)
            await _waiting_on_a_lock(conn, 2)
        await asyncio.gather(x, y)
        per_key = await conn.fetch(
            """SELECT concurrency_key, count(*) AS n FROM tasks
               WHERE queue_id = $1 AND status = 'running' GROUP BY concurrency_key""",
            queue_id,
        )
    finally:
        for c in (conn, x_conn, y_conn, blocker):
            await c.close()
    assert sorted(row["n"] for row in per_key) == [2, 2, 2]


async def test_every_in_process_claim_can_pass_over_durable_tasks(clean_database: str) -> None:
    """A worker that holds its budget of loaded state passes over durable tasks in each sort of
    queue (unlimited, limited, keyed) and claims the others; with room it claims them all."""
    uri = driver_uri(clean_database)
    conn = await asyncpg.connect(uri)
    try:
        queues = {
            "unlimited": await _queue_with_tasks(conn, 4, max_concurrency=None),  # type: ignore[arg-type]
            "limited": await _queue_with_tasks(conn, 4, max_concurrency=10),
            "keyed": await _queue_with_tasks(conn, 4, keys=2, key_concurrency=10),
        }
        # half of each queue's tasks stored state, the first ones in claim order
        await conn.execute(
            "UPDATE tasks SET priority = 2 WHERE queue_id = ANY($1::bigint[])", list(queues.values())
        )
        await conn.execute(
            """UPDATE tasks SET durable = true, state_bytes = 1024, priority = 1
               WHERE id IN (SELECT id FROM tasks t WHERE t.queue_id = ANY($1::bigint[])
                            AND (SELECT count(*) FROM tasks u WHERE u.queue_id = t.queue_id
                                 AND u.id < t.id) < 2)""",
            list(queues.values()),
        )
        worker = uuid.uuid4()
        skipping = {
            "unlimited": await task_store.claim_available(
                conn, limit=10, lease_s=30, worker_id=worker, queues=None, skip_durable=True
            ),
            **{
                name: await task_store.claim_limited(
                    conn,
                    queue_id=queues[name],
                    keyed=name == "keyed",
                    limit=10,
                    lease_s=30,
                    worker_id=worker,
                    skip_durable=True,
                )
                for name in ("limited", "keyed")
            },
        }
        assert {name: sorted(t.durable for t in got) for name, got in skipping.items()} == {
            name: [False, False] for name in queues
        }
        taking = [
            *await task_store.claim_available(conn, limit=10, lease_s=30, worker_id=worker, queues=None),
            *await task_store.claim_limited(
                conn, queue_id=queues["limited"], keyed=False, limit=10, lease_s=30, worker_id=worker
            ),
            *await task_store.claim_limited(
                conn, queue_id=queues["keyed"], keyed=True, limit=10, lease_s=30, worker_id=worker
            ),
        ]
    finally:
        await conn.close()
    assert sorted(t.durable for t in taking) == [True] * 6
