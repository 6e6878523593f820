"""The keyed claim in PostgreSQL: per-key concurrency and rate, fairness across keys, cost bounds."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from quart import Quart

from app.database import Database
from app.src.database import maintenance
from app.src.database import tasks as task_store
from tests.task_harness import fetch

WORKER = uuid.uuid4()


async def batch(client: Any, headers: dict[str, str], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    created = []
    for start in range(0, len(tasks), 1000):
        response = await client.post(
            "/api/tasks/batch", json={"tasks": tasks[start : start + 1000]}, headers=headers
        )
        assert response.status_code == 201, await response.get_data(as_text=True)
        created += (await response.get_json())["items"]
    return created


async def queue_id(database_uri: str, name: str) -> int:
    return int((await fetch(database_uri, "SELECT id FROM queues WHERE name = $1", name))[0]["id"])


async def claim(db: Database, qid: int, limit: int = 100) -> list[task_store.ClaimedTask]:
    async with db.driver() as conn:
        return await task_store.claim_limited(
            conn, queue_id=qid, keyed=True, limit=limit, lease_s=30, worker_id=WORKER
        )


async def test_key_concurrency_caps_each_key_and_other_keys_still_run(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    response = await client.put("/api/queues/keyed", json={"key_concurrency": 2}, headers=auth_headers)
    assert response.status_code == 200
    assert (await response.get_json())["key_concurrency"] == 2
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "keyed", "concurrency_key": "a"}] * 10
        + [{"kind": "noop", "queue": "keyed", "concurrency_key": "b"}] * 10
        + [{"kind": "noop", "queue": "keyed"}] * 3,
    )
    qid = await queue_id(clean_database, "keyed")
    first = await claim(db, qid)
    keys = Counter(
        r["concurrency_key"]
        for r in await fetch(clean_database, "SELECT concurrency_key FROM tasks WHERE status = 'running'")
    )
    assert keys == {"a": 2, "b": 2, None: 3}
    assert len(first) == 7
    assert await claim(db, qid) == []  # both keys are full
    # one of key a's tasks finishes (RETURNING has no order: pick it by its key, not its place)
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'completed' WHERE id = (SELECT id FROM tasks WHERE status = 'running' "
        "AND concurrency_key = 'a' LIMIT 1)",
    )
    again = await claim(db, qid)
    assert len(again) == 1
    [started] = await fetch(clean_database, "SELECT concurrency_key FROM tasks WHERE id = $1", again[0].id)
    assert started["concurrency_key"] == "a"  # the room that freed, taken by its own key


async def test_one_big_key_cannot_delay_small_keys_beyond_one_round(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await client.put("/api/queues/fair", json={"key_concurrency": 1000}, headers=auth_headers)
    await batch(client, auth_headers, [{"kind": "noop", "queue": "fair", "concurrency_key": "big"}] * 2000)
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "fair", "concurrency_key": f"small-{i}"} for i in range(50)],
    )
    qid = await queue_id(clean_database, "fair")
    first = await claim(db, qid, limit=100)
    assert len(first) == 100
    started = Counter(
        r["concurrency_key"]
        for r in await fetch(clean_database, "SELECT concurrency_key FROM tasks WHERE status = 'running'")
    )
    assert all(started[f"small-{i}"] == 1 for i in range(50))
    assert started["big"] == 50


async def test_key_rate_limit_spends_a_window_per_key(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    client = app.test_client()
    await client.put("/api/queues/paced", json={"key_rate_limit_per_s": 5}, headers=auth_headers)
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "paced", "concurrency_key": k} for k in "ab" for _ in range(20)],
    )
    qid = await queue_id(clean_database, "paced")
    first = await claim(db, qid)
    assert Counter(
        r["concurrency_key"]
        for r in await fetch(clean_database, "SELECT concurrency_key FROM tasks WHERE status = 'running'")
    ) == {"a": 5, "b": 5}
    assert len(first) == 10
    assert await claim(db, qid) == []  # the window of each key is spent


async def test_the_round_robin_turns_past_the_keys_one_claim_visits(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    # 300 keys with one task each, claims of 10 (each visits 26 keys): the cursor moves on, so
    # every key is served exactly once in 30 claims, none twice before all once.
    client = app.test_client()
    await client.put("/api/queues/many", json={"key_concurrency": 1}, headers=auth_headers)
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "many", "concurrency_key": f"k{i:03}"} for i in range(300)],
    )
    qid = await queue_id(clean_database, "many")
    seen: list[str] = []
    for _ in range(30):
        claimed = await claim(db, qid, limit=10)
        assert len(claimed) == 10
        rows = await fetch(
            clean_database,
            "SELECT concurrency_key FROM tasks WHERE id = ANY($1::uuid[])",
            [c.id for c in claimed],
        )
        seen += [r["concurrency_key"] for r in rows]
    assert len(set(seen)) == 300
    assert await claim(db, qid, limit=10) == []


async def test_a_claim_that_finds_the_queue_full_keeps_the_round_robin_in_place(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    """With max_concurrency reached, a claim (another worker woken by the same completion, or a
    poll) visited the keys anyway and moved the cursor past them all, though none had a turn: with
    18 keys and claims of 1 (17 keys visited) the cursor came back to the key just served, which
    then took every slot while the 17 other keys, ready all along, waited."""
    client = app.test_client()
    response = await client.put(
        "/api/queues/turns", json={"key_concurrency": 5, "max_concurrency": 1}, headers=auth_headers
    )
    assert response.status_code == 200
    await batch(
        client,
        auth_headers,
        [{"kind": "noop", "queue": "turns", "concurrency_key": f"k{i:02}"} for i in range(18)] * 5,
    )
    qid = await queue_id(clean_database, "turns")
    served: list[str] = []
    for _ in range(5):
        [task] = await claim(db, qid, limit=1)
        assert await claim(db, qid, limit=1) == []  # the queue is full: nothing to take
        [row] = await fetch(
            clean_database,
            "UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = $1 "
            "RETURNING concurrency_key",
            task.id,
        )
        served.append(row["concurrency_key"])
    assert served == ["k00", "k01", "k02", "k03", "k04"]  # one key after the other


async def test_a_key_rate_stored_before_tiny_rates_were_refused_paces_one_start_a_year(
    app: Quart, db: Database, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A queue row with key_rate_limit_per_s 1e-300, written while the API still took it: its
    window, 1/rate seconds, is no interval, so once a key had started, every keyed claim of the
    queue, GET of its tasks (blocked_by) and the prune of key windows failed. Its window is the
    slowest pace the API takes now: one start a year."""
    client = app.test_client()
    await client.put("/api/queues/legacy", json={"key_concurrency": 5}, headers=auth_headers)
    await fetch(clean_database, "UPDATE queues SET key_rate_limit_per_s = 1e-300 WHERE name = 'legacy'")
    created = await batch(
        client, auth_headers, [{"kind": "noop", "queue": "legacy", "concurrency_key": "k"}] * 2
    )
    qid = await queue_id(clean_database, "legacy")
    assert len(await claim(db, qid)) == 1
    await fetch(
        clean_database,
        "UPDATE task_key_starts SET updated_at = now() - interval '2 minutes' WHERE queue_id = $1",
        qid,
    )
    assert await claim(db, qid) == []  # its window holds a year
    waiting = [t["id"] for t in created if t["id"] not in {str(r["id"]) for r in await fetch(
        clean_database, "SELECT id FROM tasks WHERE status = 'running'")}]  # fmt: skip
    response = await client.get(f"/api/tasks/{waiting[0]}", headers=auth_headers)
    assert response.status_code == 200, await response.get_data(as_text=True)
    assert [b["reason"] for b in (await response.get_json())["blocked_by"]][:1] == ["key_rate_limit"]
    async with db.driver() as conn:
        assert await maintenance.prune_flow_state(conn, older_than_s=86_400) == 0  # the window is kept
