"""Task storage: every SQL statement of the engine, written once, named, and commented.

Hot paths run on a pooled asyncpg connection (`Database.driver()`), with arrays (`unnest`) or one
JSON array of rows (`json_to_recordset`) so a batch of any size is one round trip. Every UPDATE
that changes a status is a compare-and-set guarded by the source statuses the state machine
allows, so a task that finished meanwhile is never overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import dacite

from app.src.api.models.tasks import MAX_DELAY_S, Attempt, Task
from app.src.api.state_machine import Status, sources
from app.src.utils import json_text
from app.src.utils.records import record

EVENTS_CHANNEL = "taskgate_events"  # payload: comma-separated task ids whose state changed
AVAILABLE_CHANNEL = "taskgate_available"  # payload: comma-separated queue ids with new work
CANCEL_CHANNEL = "taskgate_cancel"  # payload: id of a running task a client asked to cancel
_NOTIFY_IDS_PER_MESSAGE = 200  # 200 * 37 bytes stays under NOTIFY's 8000-byte payload limit

TASK_COLUMNS = (
    "id, client_id, queue_id, queue, kind, payload, status, priority, attempts, max_attempts, "
    "run_at, created_at, started_at, finished_at, result, last_error, progress, cancel_requested, schedule, "
    "concurrency_key, waiting_for, parent_id, depends_on, durable"
)
_DACITE = dacite.Config(check_types=False)


class Executor(Protocol):
    """What the statements need from a connection: asyncpg's, or SQLAlchemy's via `SqlExecutor`."""

    async def fetch(self, query: str, *args: Any) -> Sequence[Mapping[str, Any]]: ...


_TASK_FIELDS = tuple(Task.__dataclass_fields__)


def to_task(row: Mapping[str, Any]) -> Task:
    # Built directly rather than with dacite: this runs for every task an API call returns, and a
    # generic mapper costs more per row than the insert does (TASK_COLUMNS matches Task exactly).
    return Task(*(row[name] for name in _TASK_FIELDS))


def notify_events(source: str) -> str:
    """A CTE that NOTIFYs the ids of `source` in chunks; join it once to make it run."""
    return f"""
    notified AS (
        SELECT count(pg_notify('{EVENTS_CHANNEL}', ids)) AS n FROM (
            SELECT string_agg(id::text, ',') AS ids
            FROM (SELECT id, (row_number() OVER ()) / {_NOTIFY_IDS_PER_MESSAGE} AS chunk FROM {source}) c
            GROUP BY chunk
        ) chunks
    )"""


def notify_queues(name: str, queue_ids: str) -> str:
    """A CTE `name` that tells workers these queues have work: the distinct ids `queue_ids` selects
    (a query of one column, queue_id), in chunks of 200 so that no message passes NOTIFY's 8000
    bytes (one message naming them all failed the statement, and staging with it, for good, once
    its rows spanned a thousand queues or so)."""
    return f"""
    {name} AS (
        SELECT count(pg_notify('{AVAILABLE_CHANNEL}', ids)) AS n FROM (
            SELECT string_agg(queue_id::text, ',') AS ids
            FROM (SELECT queue_id, (row_number() OVER ()) / {_NOTIFY_IDS_PER_MESSAGE} AS chunk
                  FROM (SELECT DISTINCT queue_id FROM ({queue_ids}) q) d) c
            GROUP BY chunk
        ) chunks
    )"""


def _notify_room(source: str) -> str:
    """A CTE that wakes every worker for the concurrency-limited queues of `source`'s finished
    rows: room frees cluster-wide, not only in the worker that wrote the completion."""
    return notify_queues(
        "room",
        f"""SELECT q.id AS queue_id FROM queues q
            WHERE q.id IN (SELECT queue_id FROM {source})
              AND (q.max_concurrency IS NOT NULL OR q.key_concurrency IS NOT NULL)""",
    )


# --- enqueue -------------------------------------------------------------------------------------

# One statement for one task or a thousand. The rows travel as one JSON array (json_to_recordset):
# the driver would otherwise encode thirteen arrays element by element, which cost the API process
# more than building and writing the JSON does. A task due now is `available` at once; a later one
# is `scheduled` until staging makes it available. Workers hear about it through one NOTIFY per
# statement (NOTIFY takes a global lock at commit, OCA/queue#811).
INSERT_TASKS = f"""
WITH input AS (
    SELECT * FROM json_to_recordset($1::json)
        AS i(id uuid, client_id uuid, queue_id bigint, queue text, kind text, payload jsonb,
             priority smallint, max_attempts int, run_at timestamptz, delay_s float8, schedule jsonb,
             concurrency_key text, traceparent text)
),
inserted AS (
    INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, priority, max_attempts, run_at,
                       schedule, concurrency_key, traceparent)
    SELECT i.id, i.client_id, i.queue_id, i.queue, i.kind, i.payload,
           CASE WHEN due.at <= now() THEN 'available' ELSE 'scheduled' END,
           i.priority, i.max_attempts, due.at, i.schedule, i.concurrency_key, i.traceparent
    FROM input i
    CROSS JOIN LATERAL (
        SELECT COALESCE(i.run_at, now() + make_interval(secs => COALESCE(i.delay_s, 0)), now()) AS at
    ) due
    RETURNING id, queue_id, status, run_at, created_at
),
{notify_queues("woken", "SELECT queue_id FROM inserted WHERE status = 'available'")}
SELECT inserted.id, inserted.status, inserted.run_at, inserted.created_at, (SELECT n FROM woken) AS _woken
FROM inserted
"""


@record
class NewTask:
    id: UUID
    client_id: UUID
    queue_id: int
    queue: str
    kind: str
    payload: dict[str, Any]
    priority: int
    max_attempts: int
    run_at: datetime | None
    delay_s: float | None
    schedule: dict[str, Any] | None = None  # the schedule fire that made it (ScheduleRef fields)
    concurrency_key: str | None = None
    debounce: Debounce | None = None
    traceparent: str | None = None  # W3C trace context it was enqueued in (app/src/utils/tracing.py)


@dataclass(frozen=True, slots=True)
class Debounce:
    key: str
    period_s: float
    max_wait_s: float | None


async def insert_tasks(conn: Executor, tasks: Sequence[NewTask]) -> list[Task]:
    rows = await conn.fetch(
        INSERT_TASKS,
        # each NewTask is written as an object of its fields (orjson writes dataclasses itself);
        # json_to_recordset takes the columns it names and ignores the rest (debounce)
        json_text.dumps_rows(tasks),
    )
    # only what the database decided comes back; the rest is what was sent (no payload round trip)
    by_id = {row["id"]: row for row in rows}
    return [_inserted(t, by_id[t.id]) for t in tasks]


def _inserted(new: NewTask, row: Mapping[str, Any]) -> Task:
    return Task(
        id=new.id,
        client_id=new.client_id,
        queue_id=new.queue_id,
        queue=new.queue,
        kind=new.kind,
        payload=new.payload,
        status=row["status"],
        priority=new.priority,
        attempts=0,
        max_attempts=new.max_attempts,
        run_at=row["run_at"],
        created_at=row["created_at"],
        started_at=None,
        finished_at=None,
        result=None,
        last_error=None,
        progress=None,
        schedule=new.schedule,
        concurrency_key=new.concurrency_key,
    )


# Debounce: one statement per task, race-free through the unique index tasks_debounce (client_id,
# debounce_key) WHERE status IN ('scheduled', 'available'): the first enqueue inserts; while that
# task has not started, every later one meets it in ON CONFLICT, which locks the row and replaces
# its payload and run_at (now + period_s, never past the first enqueue + max_wait_s: the first
# enqueue's own run_at is bounded alike; LEAST ignores a NULL max_wait_s). A claim that
# takes the row meanwhile moves it out of the index, and the insert then goes ahead: a new task.
# Only a task of the same queue and kind is folded into: one of another kind would be given a
# payload its contract never checked. Then nothing is written and nothing comes back.
DEBOUNCE_TASK = f"""
WITH upserted AS (
    INSERT INTO tasks AS t (id, client_id, queue_id, queue, kind, payload, status, priority, max_attempts,
                            run_at, concurrency_key, debounce_key, debounce_until, traceparent)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb,
            CASE WHEN LEAST($9::float8, $12::float8) <= 0 THEN 'available' ELSE 'scheduled' END,
            $7, $8, now() + make_interval(secs => LEAST($9::float8, $12::float8)), $10, $11,
            now() + make_interval(secs => $12::float8), $13)
    ON CONFLICT (client_id, debounce_key)
        WHERE debounce_key IS NOT NULL AND status IN ('scheduled', 'available')
    DO UPDATE SET
        payload = EXCLUDED.payload,
        run_at = LEAST(EXCLUDED.run_at, COALESCE(t.debounce_until, 'infinity')),
        status = CASE WHEN LEAST(EXCLUDED.run_at, COALESCE(t.debounce_until, 'infinity')) > now()
                      THEN 'scheduled' ELSE t.status END
    WHERE t.queue_id = EXCLUDED.queue_id AND t.kind = EXCLUDED.kind
    RETURNING {TASK_COLUMNS}, (xmax = 0) AS created
),
woken AS (
    SELECT count(pg_notify('{AVAILABLE_CHANNEL}', queue_id::text)) AS n
    FROM upserted WHERE status = 'available'
),
evented AS (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) AS n FROM upserted WHERE NOT created)
SELECT upserted.*, (SELECT n FROM woken) + (SELECT n FROM evented) AS _n FROM upserted
"""


# The pending tasks that hold these debounce keys (index: tasks_debounce): an enqueue that only
# replaces one's payload adds no task.
PENDING_DEBOUNCED = """
SELECT debounce_key, queue_id, kind FROM tasks
WHERE client_id = $1 AND debounce_key = ANY($2::text[]) AND debounce_key IS NOT NULL
  AND status IN ('scheduled', 'available')
"""


async def pending_debounced(
    conn: Executor, *, client_id: UUID, keys: Sequence[str]
) -> dict[str, tuple[int, str]]:
    """{debounce key: (queue id, kind)} of the client's pending tasks that hold these keys."""
    rows = await conn.fetch(PENDING_DEBOUNCED, client_id, list(keys))
    return {row["debounce_key"]: (row["queue_id"], row["kind"]) for row in rows}


class DebounceKeyTaken(Exception):
    """The debounce key is held by a pending task of another queue or kind."""


async def debounce_task(conn: Executor, task: NewTask) -> tuple[Task, bool]:
    """Insert `task`, or fold it into the pending task of its debounce key; (task, debounced).

    Raises DebounceKeyTaken when that pending task is of another queue or kind."""
    if task.debounce is None:
        raise ValueError("debounce_task needs a task with debounce")
    rows = await conn.fetch(
        DEBOUNCE_TASK,
        task.id,
        task.client_id,
        task.queue_id,
        task.queue,
        task.kind,
        json_text.dumps(task.payload),
        task.priority,
        task.max_attempts,
        task.debounce.period_s,
        task.concurrency_key,
        task.debounce.key,
        task.debounce.max_wait_s,
        task.traceparent,
    )
    if not rows:
        raise DebounceKeyTaken(task.debounce.key)
    return to_task(rows[0]), not rows[0]["created"]


# --- idempotency ---------------------------------------------------------------------------------


async def lock_idempotency_key(conn: Executor, client_id: UUID, key: str) -> bool:
    """Try the transaction-scoped lock of (client, key); False while another request holds it."""
    rows = await conn.fetch(
        "SELECT pg_try_advisory_xact_lock(hashtextextended($1::text || '/' || $2, 7)) AS locked",
        str(client_id),
        key,
    )
    return bool(rows[0]["locked"])


async def find_idempotency_key(conn: Executor, client_id: UUID, key: str) -> tuple[str, list[UUID]] | None:
    rows = await conn.fetch(
        "SELECT request_hash, task_ids FROM idempotency_keys WHERE client_id = $1 AND key = $2",
        client_id,
        key,
    )
    if not rows:
        return None
    return rows[0]["request_hash"], list(rows[0]["task_ids"])


async def save_idempotency_key(
    conn: Executor, client_id: UUID, key: str, request_hash: str, task_ids: list[UUID]
) -> None:
    await conn.fetch(
        "INSERT INTO idempotency_keys (client_id, key, request_hash, task_ids) VALUES ($1, $2, $3, $4)",
        client_id,
        key,
        request_hash,
        task_ids,
    )


# --- claim ---------------------------------------------------------------------------------------

# THE CLAIM. One statement: pick, lock and mark running, for many tasks at once.
#
# Index: tasks_claim (queue_id, priority, run_at, id) WHERE status = 'available'. It holds only
# claimable rows, so a million finished (or scheduled, or running) tasks are simply not in it and
# the cost of a claim depends on the batch size, not on the table. For each active queue the
# LATERAL probe reads the index in claim order and stops after LIMIT rows; SKIP LOCKED lets
# concurrent workers take disjoint rows without waiting. The CTE fences the pick from the UPDATE
# (Oban's note: without it the planner may update more rows than LIMIT), and the UPDATE reaches the
# picked rows through the primary key (id = ANY(array)): a join on picked.id let the planner choose
# a sequential scan of the whole table, whose cost grows with history.
#
# Queues in random order share the batch fairly over time. Paused queues are excluded here, read
# live, so pausing takes effect at the next claim; queues with a concurrency or rate limit go
# through CLAIM_LIMITED, one queue at a time.
#
# Two sorts of workers run the same statements, which differ only in which kinds they may take:
# - in-process workers (CLAIM_AVAILABLE, CLAIM_LIMITED) never take a client's remote kind: each
#   candidate row read from tasks_claim is checked against remote_kinds' primary key (client_id,
#   name), one index probe per row, nothing when the client has no remote kinds;
# - remote workers (CLAIM_AVAILABLE_KINDS, CLAIM_LIMITED_KINDS) take only the kinds they name, of
#   their own client's queues: one probe per (queue, kind) on tasks_claim_kind (queue_id, kind,
#   priority, run_at, id) WHERE status = 'available', read in claim order, so a backlog of
#   another kind in the same queue is never walked past.
_NOT_REMOTE = (
    "AND NOT EXISTS (SELECT 1 FROM remote_kinds r WHERE r.client_id = t.client_id AND r.name = t.kind)"
)
# In-process claims only: while its worker holds its budget of loaded durable state (app/worker/
# claiming.py), a claim passes over durable tasks ({flag} true) instead of claiming them to hand
# them back. A filter on the rows the index scan reads (no index change, the generic plan kept);
# false costs one boolean test per row read.
_NOT_DURABLE = "AND NOT (t.durable AND {flag}::boolean)"


def _claim_available(*, remote: bool) -> str:
    return f"""
WITH active AS (
    SELECT id FROM queues
    WHERE NOT paused AND max_concurrency IS NULL AND rate_limit_per_s IS NULL
      AND key_concurrency IS NULL AND key_rate_limit_per_s IS NULL
      AND ($4::text[] IS NULL OR name = ANY($4::text[]))
      {"AND client_id = $6" if remote else ""}
    ORDER BY random()
),
picked AS (
    SELECT c.id
    FROM active q
    {"CROSS JOIN unnest($5::text[]) k(kind)" if remote else ""}
    CROSS JOIN LATERAL (
        SELECT t.id FROM tasks t
        WHERE t.queue_id = q.id AND t.status = 'available' AND t.run_at <= now()
          {"AND t.kind = k.kind" if remote else _NOT_REMOTE + " " + _NOT_DURABLE.format(flag="$5")}
        ORDER BY t.priority, t.run_at, t.id
        LIMIT $1
        FOR UPDATE OF t SKIP LOCKED
    ) c
    LIMIT $1
),
claimed AS (
    UPDATE tasks t
    SET status = 'running', attempts = t.attempts + 1, started_at = now(),
        lease_expires_at = now() + make_interval(secs => $2), worker_id = $3,
        debounce_key = NULL  -- started: no longer debounced (tasks_debounce)
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id, t.client_id, t.queue_id, t.queue, t.kind, t.payload, t.attempts, t.max_attempts,
              t.run_at, t.started_at, t.durable, t.attempts_before_retry
),
{notify_events("claimed")}
SELECT claimed.*, (SELECT n FROM notified) AS _notified FROM claimed
"""


CLAIM_AVAILABLE = _claim_available(remote=False)  # $5 pass over durable tasks
CLAIM_AVAILABLE_KINDS = _claim_available(remote=True)  # $5 kinds, $6 client

# Limited queues, in one statement and without a lock. The statement counts the queue's running
# tasks and reads its token bucket in its snapshot; a claim by another worker that committed
# after that snapshot was taken is not in the count. So the write of the claim is guarded: `bumped`
# advances the queue's claim_seq only if it still holds the value this statement read (an UPDATE
# waits for a concurrent claim's row lock, then re-checks its WHERE against the committed row), and
# the tasks are marked running only if `bumped` wrote. Of two claims that counted the same running
# tasks, one is written and the other claims nothing and reports the conflict (`_conflict`): the
# caller claims again at once, in a fresh snapshot. The count is therefore exact across all worker
# processes (of both sorts); a completion committed after the snapshot only makes it conservative.
# One round trip, no transaction held open across round trips, and no lock taken when nothing is
# claimable.
#
# The pick's LIMIT is the allowance, known only inside the statement; the planner assumes a tenth
# of the rows for it and still reads tasks_claim in claim order (EXPLAIN with 10,000 waiting tasks:
# an index scan stopping after the allowance, no sort).


# The rules of the limited claims, as SQL fragments over a queue row `q`. blocked_by
# (app/src/database/flow.py) evaluates the same fragments for one task: what it reports is what
# the claim applies.
# The queue's token bucket (rate_limit_per_s): NULL without a rate limit (LEAST and GREATEST skip
# NULLs: the bucket would hold 1).
QUEUE_TOKENS = """CASE WHEN q.rate_limit_per_s IS NOT NULL THEN
               LEAST(GREATEST(q.rate_limit_per_s, 1),
                     q.rate_tokens + EXTRACT(epoch FROM now() - q.rate_updated_at) * q.rate_limit_per_s)
           END"""
# Room under max_concurrency (NULL: no limit, and nothing counted); index tasks_queue_status.
QUEUE_ROOM = (
    "CASE WHEN q.max_concurrency IS NOT NULL THEN q.max_concurrency - "
    "(SELECT count(*) FROM tasks WHERE queue_id = {queue} AND status = 'running') END"
)
# Room of one key under key_concurrency (NULL: no limit, and nothing counted); index
# tasks_running_key, at most key_concurrency rows.
KEY_ROOM = (
    "CASE WHEN q.key_concurrency IS NOT NULL THEN q.key_concurrency - "
    "(SELECT count(*) FROM tasks r WHERE r.queue_id = {queue} "
    "AND r.concurrency_key = {key} AND r.status = 'running') END"
)
# The key rate limit is a sliding window: at most `cap` starts per key within the last `window`
# seconds (1 s, or 1/rate below one per second), logged in task_key_starts by the claims, and
# pruned by maintenance once it has passed. At most a year: the slowest rate the API takes
# (MIN_KEY_RATE_PER_S); a rate stored before that (1e-300) made a window that is no interval, and
# every statement computing it failed.
KEY_WINDOW_S = f"LEAST(GREATEST(1, 1 / q.key_rate_limit_per_s), {MAX_DELAY_S})"
KEY_WINDOW_CAP = f"GREATEST(1, floor(q.key_rate_limit_per_s * {KEY_WINDOW_S}))::int"
KEY_RATE_ROOM = (
    f"CASE WHEN q.key_rate_limit_per_s IS NOT NULL THEN {KEY_WINDOW_CAP} - ("
    "SELECT count(*) FROM task_key_starts s, unnest(s.starts) st "
    "WHERE s.queue_id = {queue} AND s.key = {key} "
    f"AND st > {{at}} - make_interval(secs => {KEY_WINDOW_S})) END"
)  # NULL without a key rate limit (GREATEST skips NULLs: the window would hold 1)


def _claim_limited(*, remote: bool) -> str:
    pick_in_process = f"""
    SELECT t.id FROM tasks t
    WHERE t.queue_id = $1 AND t.status = 'available' AND t.run_at <= now()
      {_NOT_REMOTE} {_NOT_DURABLE.format(flag="$5")}
    ORDER BY t.priority, t.run_at, t.id
    LIMIT COALESCE((SELECT n FROM allowance), 0)
    FOR UPDATE SKIP LOCKED"""
    pick_remote = """
    SELECT c.id FROM unnest($5::text[]) k(kind)
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.run_at FROM tasks t
        WHERE t.queue_id = $1 AND t.kind = k.kind AND t.status = 'available' AND t.run_at <= now()
        ORDER BY t.priority, t.run_at, t.id
        LIMIT COALESCE((SELECT n FROM allowance), 0)
        FOR UPDATE OF t SKIP LOCKED
    ) c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT COALESCE((SELECT n FROM allowance), 0)"""
    return f"""
WITH q AS (
    SELECT q.id, q.max_concurrency, q.rate_limit_per_s, q.claim_seq, {QUEUE_TOKENS} AS tokens
    FROM queues q
    WHERE q.id = $1 AND NOT q.paused AND q.key_concurrency IS NULL AND q.key_rate_limit_per_s IS NULL
),
allowance AS (
    SELECT GREATEST(0, LEAST(
        $2::int,
        COALESCE({QUEUE_ROOM.format(queue="$1")}, $2::int),
        COALESCE(floor(q.tokens)::int, $2::int)
    )) AS n, q.tokens, q.claim_seq
    FROM q
),
picked AS ({pick_remote if remote else pick_in_process}
),
bumped AS (
    UPDATE queues
    SET claim_seq = claim_seq + 1,
        rate_tokens = CASE WHEN rate_limit_per_s IS NULL THEN rate_tokens
                           ELSE (SELECT tokens FROM allowance) - (SELECT count(*) FROM picked) END,
        rate_updated_at = CASE WHEN rate_limit_per_s IS NULL THEN rate_updated_at ELSE now() END
    WHERE id = $1 AND NOT paused AND claim_seq = (SELECT claim_seq FROM allowance)
      AND key_concurrency IS NULL AND key_rate_limit_per_s IS NULL
      AND EXISTS (SELECT 1 FROM picked)
    RETURNING id
),
claimed AS (
    UPDATE tasks t
    SET status = 'running', attempts = t.attempts + 1, started_at = now(),
        lease_expires_at = now() + make_interval(secs => $3), worker_id = $4, debounce_key = NULL
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND EXISTS (SELECT 1 FROM bumped)
    RETURNING t.id, t.client_id, t.queue_id, t.queue, t.kind, t.payload, t.attempts, t.max_attempts,
              t.run_at, t.started_at, t.durable, t.attempts_before_retry
),
{notify_events("claimed")}
SELECT claimed.*, (SELECT n FROM notified) AS _notified, false AS _conflict FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
WHERE EXISTS (SELECT 1 FROM picked) AND NOT EXISTS (SELECT 1 FROM bumped)
"""


CLAIM_LIMITED = _claim_limited(remote=False)  # $5 pass over durable tasks
LIMITED_CLAIM_TRIES = 5
CLAIM_LIMITED_KINDS = _claim_limited(remote=True)  # $5 kinds


# THE KEYED CLAIM: queues with key_concurrency or key_rate_limit_per_s, guarded like
# CLAIM_LIMITED (one statement, no lock held: `turned` writes the queue row only if its claim_seq
# still holds the value this statement read, and the tasks are marked running only if it wrote), so
# per-key counts and rate windows are exact across every worker process, of both sorts. Fair
# across keys: round-robin by key within priority (Hatchet's RunGroupRoundRobin, DBOS's
# partitioned queues), so a key with 100,000 waiting tasks delays a key with one by at most one
# claim round.
#
# 1. Keys are found by a loose index scan (a recursive CTE, as DBOS walks its partitions) over
#    tasks_claim_key (queue_id, concurrency_key, priority, run_at, id) WHERE status = 'available'
#    AND concurrency_key IS NOT NULL: one index probe finds the next key that has an available
#    task. Keys with nothing available are not in that index at all, so 10,000 idle keys cost
#    nothing. The walk starts after queues.key_cursor (the round-robin position) and wraps, and
#    visits at most $6 keys (a little more than the batch): the cost of one claim is bounded by
#    the batch, not by the number of keys. Keys that have tasks but no room (full, or out of
#    tokens) cost one visit each when their turn comes and are passed over; the cursor moves on.
# 2. Per visited key: its room, the least of key_concurrency minus its running tasks
#    (tasks_running_key, a handful of rows) and the starts left in its rate window
#    (task_key_starts, primary key), then its head tasks in claim order (tasks_claim_key again,
#    LIMIT room).
# 3. The candidates are ordered by (priority, rank within their key, turn) and cut at the queue's
#    allowance (max_concurrency, rate_limit_per_s, the batch): every key gets its first task
#    before any key gets a second.
# Tasks without a key in a keyed queue form one more group, not key-limited, read from the head of
# tasks_claim, at most the allowance deep (a keyless task queued behind more than that many waiting
# keyed tasks waits until they have started: give every task of a keyed queue a key).
# Cost with 10,000 keys that all have work: a claim of 100 visits 116 keys, about 3 index probes
# each (next key, running count, head tasks): ~350 probes and ~2.5 ms per claim of 100 on the
# 2-core machine, against ~100 probes and ~1.9 ms for the keyless claim. No LIMIT is a parameter
# (each is computed inside the statement), so the planner's generic plan costs what the custom ones
# do and the plan cache keeps it after five executions: planning this long statement afresh took
# 1.3 ms, more than half of running it. Measured end to end in `make bench` (flow:
# claim cost with 10,000 keys). The claim once ran in a transaction under the queue row lock;
# its three more round trips per claim took a third of the keyed drain's time (1.89 s against
# 1.22 s for 20,000 tasks).
# The UPDATE re-checks status on each row (READ COMMITTED re-evaluates a row changed meanwhile),
# so no SKIP LOCKED is needed: a concurrent claim of this queue loses at `turned` instead.
def _claim_keyed(*, remote: bool) -> str:
    # ($5 is NULL for in-process workers, which never take a client's remote kinds; $7 theirs only)
    kind_filter = (
        "AND t.kind = ANY($5::text[])"
        if remote
        else f"{_NOT_REMOTE} AND $5::text[] IS NULL {_NOT_DURABLE.format(flag='$7')}"
    )
    next_key = """(SELECT t.concurrency_key FROM tasks t
            WHERE t.queue_id = $1 AND t.status = 'available' AND t.concurrency_key IS NOT NULL
              AND t.concurrency_key > {after}
            ORDER BY t.concurrency_key LIMIT 1)"""
    return f"""
WITH RECURSIVE
clock AS MATERIALIZED (SELECT clock_timestamp() AS at),
q AS MATERIALIZED (
    SELECT q.id, q.max_concurrency, q.rate_limit_per_s, q.key_concurrency, q.key_rate_limit_per_s,
           q.key_cursor, q.claim_seq, {QUEUE_TOKENS} AS tokens
    FROM queues q WHERE q.id = $1 AND NOT q.paused
      AND (q.key_concurrency IS NOT NULL OR q.key_rate_limit_per_s IS NOT NULL)
),
allowance AS MATERIALIZED (
    SELECT GREATEST(0, LEAST(
        $2::int,
        COALESCE({QUEUE_ROOM.format(queue="$1")}, $2::int),
        COALESCE(floor(q.tokens)::int, $2::int)
    )) AS n, q.tokens
    FROM q
),
-- no keys are walked while the queue has no room (max_concurrency reached, or no token): they
-- would all be passed over without a turn, and the cursor moved past them (see `passed`)
after_cursor(key, pos) AS (
    SELECT {next_key.format(after="COALESCE((SELECT key_cursor FROM q), '')")}, 1
    WHERE (SELECT n FROM allowance) > 0
    UNION ALL
    SELECT {next_key.format(after="a.key")}, a.pos + 1
    FROM after_cursor a WHERE a.key IS NOT NULL AND a.pos < $6
),
after_n AS MATERIALIZED (SELECT count(key) AS n FROM after_cursor),
from_start(key, pos) AS (
    SELECT {next_key.format(after="''")}, (SELECT n FROM after_n) + 1
    WHERE (SELECT key_cursor FROM q) IS NOT NULL AND (SELECT n FROM after_n) < $6
      AND (SELECT n FROM allowance) > 0
    UNION ALL
    SELECT {next_key.format(after="f.key")}, f.pos + 1
    FROM from_start f
    WHERE f.key IS NOT NULL AND f.key < (SELECT key_cursor FROM q) AND f.pos < $6
),
keys AS MATERIALIZED (
    SELECT key, pos FROM after_cursor WHERE key IS NOT NULL
    UNION ALL
    SELECT key, pos FROM from_start WHERE key IS NOT NULL AND key <= (SELECT key_cursor FROM q)
),
state AS MATERIALIZED (
    SELECT k.key, k.pos, LEAST(
        COALESCE({KEY_ROOM.format(queue="$1", key="k.key")}, $2::int),
        COALESCE({KEY_RATE_ROOM.format(queue="$1", key="k.key", at="(SELECT at FROM clock)")}, $2::int),
        (SELECT n FROM allowance)
    ) AS room
    FROM keys k, q
),
-- keys with room: each of them takes one of the allowance first, so no key needs more than what
-- the others leave (a claim over many keys reads one head row per key, not `room` of them)
open_keys AS MATERIALIZED (SELECT count(*) AS n FROM state WHERE room > 0),
candidates AS (
    SELECT c.id, c.priority, c.rn, s.pos
    FROM state s
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority, row_number() OVER (ORDER BY t.priority, t.run_at, t.id) AS rn
        FROM tasks t
        WHERE t.queue_id = $1 AND t.concurrency_key = s.key AND t.status = 'available'
          AND t.run_at <= now() {kind_filter}
        ORDER BY t.priority, t.run_at, t.id
        LIMIT GREATEST(1, LEAST(s.room, (SELECT n FROM allowance) - (SELECT n FROM open_keys) + 1))
    ) c
    WHERE s.room > 0
    UNION ALL
    SELECT h.id, h.priority, row_number() OVER (ORDER BY h.priority, h.run_at, h.id), 0
    FROM (
        SELECT t.id, t.priority, t.run_at, t.concurrency_key FROM tasks t
        WHERE t.queue_id = $1 AND t.status = 'available' AND t.run_at <= now() {kind_filter}
        ORDER BY t.priority, t.run_at, t.id
        LIMIT (SELECT $2::int)  -- the batch, as a subquery: no LIMIT is a parameter (see above)
    ) h
    WHERE h.concurrency_key IS NULL
),
picked AS MATERIALIZED (
    SELECT id, pos FROM candidates ORDER BY priority, rn, pos LIMIT (SELECT n FROM allowance)
),
turned AS (
    -- one UPDATE of the queue row: the bucket spent, the round-robin position, and claim_seq,
    -- written only if claim_seq still holds the value this statement read (see CLAIM_LIMITED).
    -- The bucket is charged for the picked tasks: one cancelled between the pick and the write
    -- below still spends its token.
    UPDATE queues
    SET claim_seq = claim_seq + 1,
        rate_tokens = CASE WHEN rate_limit_per_s IS NOT NULL
                           THEN (SELECT tokens FROM allowance) - (SELECT count(*) FROM picked)
                           ELSE rate_tokens END,
        rate_updated_at = CASE WHEN rate_limit_per_s IS NOT NULL THEN now() ELSE rate_updated_at END,
        key_cursor = COALESCE(CASE
            WHEN (SELECT count(*) FROM picked) >= (SELECT n FROM allowance)
            THEN (SELECT k.key FROM keys k WHERE k.pos = (SELECT max(pos) FROM picked WHERE pos > 0))
            ELSE (SELECT k.key FROM keys k ORDER BY k.pos DESC LIMIT 1)
        END, CASE WHEN (SELECT count(*) FROM keys) = 0 THEN NULL ELSE key_cursor END)
    WHERE id = $1 AND NOT paused AND claim_seq = (SELECT claim_seq FROM q)
      AND (key_concurrency IS NOT NULL OR key_rate_limit_per_s IS NOT NULL)
      AND EXISTS (SELECT 1 FROM picked)
    RETURNING 1
),
passed AS (
    -- nothing picked, keys visited (all full or out of tokens): only the round-robin position
    -- moves on (a data-modifying CTE runs whether or not it is read). Unguarded, as it orders keys
    -- and limits nothing: a claim that finds no room never makes one that does lose its race.
    -- A queue without room visits no keys: moved past keys that had no turn, the cursor came back
    -- round to the key just served, which then took every slot that freed.
    UPDATE queues
    SET key_cursor = COALESCE((SELECT k.key FROM keys k ORDER BY k.pos DESC LIMIT 1), key_cursor)
    WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM picked) AND EXISTS (SELECT 1 FROM keys)
    RETURNING 1
),
claimed AS (
    UPDATE tasks t
    SET status = 'running', attempts = t.attempts + 1, started_at = (SELECT at FROM clock),
        lease_expires_at = (SELECT at FROM clock) + make_interval(secs => $3), worker_id = $4,
        debounce_key = NULL
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.status = 'available'
      AND EXISTS (SELECT 1 FROM turned)
    RETURNING t.id, t.client_id, t.queue_id, t.queue, t.kind, t.payload, t.attempts, t.max_attempts,
              t.run_at, t.started_at, t.durable, t.attempts_before_retry, t.concurrency_key
),
logged AS (
    INSERT INTO task_key_starts AS s (queue_id, key, starts, updated_at)
    SELECT $1, c.concurrency_key, array_agg((SELECT at FROM clock)), (SELECT at FROM clock)
    FROM claimed c
    WHERE c.concurrency_key IS NOT NULL AND (SELECT key_rate_limit_per_s FROM q) IS NOT NULL
    GROUP BY c.concurrency_key
    ON CONFLICT (queue_id, key) DO UPDATE
    SET starts = ARRAY(
            SELECT st FROM unnest(s.starts) st
            WHERE st > EXCLUDED.updated_at
                       - make_interval(secs => (SELECT {KEY_WINDOW_S} FROM q))
        ) || EXCLUDED.starts,
        updated_at = EXCLUDED.updated_at
    RETURNING 1
),
{notify_events("claimed")}
SELECT claimed.*, (SELECT n FROM notified) AS _notified, (SELECT count(*) FROM logged) AS _logged,
       false AS _conflict
FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
WHERE EXISTS (SELECT 1 FROM picked) AND NOT EXISTS (SELECT 1 FROM turned)
"""


CLAIM_KEYED = _claim_keyed(remote=False)  # $7 pass over durable tasks
CLAIM_KEYED_KINDS = _claim_keyed(remote=True)  # $5 kinds


def keys_per_claim(limit: int) -> int:
    """How many keys one keyed claim visits at most: the batch, plus room for some full keys."""
    return limit + max(16, limit // 8)


LIMITED_QUEUES = """
SELECT id, max_concurrency, key_concurrency IS NOT NULL OR key_rate_limit_per_s IS NOT NULL AS keyed
FROM queues
WHERE NOT paused
  AND (max_concurrency IS NOT NULL OR rate_limit_per_s IS NOT NULL
       OR key_concurrency IS NOT NULL OR key_rate_limit_per_s IS NOT NULL)
  AND ($1::text[] IS NULL OR name = ANY($1::text[]))
  AND ($2::uuid IS NULL OR client_id = $2)
"""


@dataclass(frozen=True, slots=True)
class KindsFilter:
    """What a remote worker may claim: these kinds, of this client's queues only."""

    client_id: UUID
    kinds: list[str]


@record
class ClaimedTask:
    id: UUID
    client_id: UUID
    queue_id: int
    queue: str
    kind: str
    payload: Any
    attempt: int
    max_attempts: int
    run_at: datetime
    started_at: datetime
    durable: bool = False  # it stored steps, signals or children: the worker loads them
    retry_base: int = 0  # attempts_before_retry: attempts that were no failure (outcomes.after_failure)


def _claimed(rows: Sequence[Mapping[str, Any]]) -> list[ClaimedTask]:
    return [
        ClaimedTask(
            r["id"],
            r["client_id"],
            r["queue_id"],
            r["queue"],
            r["kind"],
            r["payload"],
            r["attempts"],
            r["max_attempts"],
            r["run_at"],
            r["started_at"],
            r["durable"],
            r["attempts_before_retry"],
        )
        for r in rows
    ]


async def claim_available(
    conn: Executor,
    *,
    limit: int,
    lease_s: float,
    worker_id: UUID,
    queues: list[str] | None,
    kinds: KindsFilter | None = None,
    skip_durable: bool = False,
) -> list[ClaimedTask]:
    """Claim from unlimited queues: any kind but remote ones, or (`kinds`) a remote worker's.
    `skip_durable` (in-process only): pass over tasks that have stored state to load."""
    if kinds is None:
        return _claimed(await conn.fetch(CLAIM_AVAILABLE, limit, lease_s, worker_id, queues, skip_durable))
    rows = await conn.fetch(
        CLAIM_AVAILABLE_KINDS, limit, lease_s, worker_id, queues, kinds.kinds, kinds.client_id
    )
    return _claimed(rows)


@dataclass(frozen=True, slots=True)
class LimitedQueue:
    id: int
    max_concurrency: int | None
    keyed: bool  # key_concurrency or key_rate_limit_per_s: CLAIM_KEYED


async def limited_queues(
    conn: Executor, *, queues: list[str] | None, client_id: UUID | None = None
) -> list[LimitedQueue]:
    """The limited queues a claim may take from."""
    rows = await conn.fetch(LIMITED_QUEUES, queues, client_id)
    return [LimitedQueue(row["id"], row["max_concurrency"], row["keyed"]) for row in rows]


async def claim_limited(
    conn: Any,
    *,
    queue_id: int,
    limit: int,
    lease_s: float,
    worker_id: UUID,
    keyed: bool,
    kinds: KindsFilter | None = None,
    skip_durable: bool = False,
) -> list[ClaimedTask]:
    """Claim from one limited queue; `conn` is an asyncpg connection (`skip_durable`: as for
    claim_available).

    One statement, CLAIM_LIMITED or (`keyed`, from `limited_queues`) CLAIM_KEYED, taken again in a
    fresh snapshot while a concurrent claim of the same queue won the race (each lost race means
    another claim was written). Either claims nothing from a queue of the other sort. With `kinds`,
    the queue must be one of `limited_queues(client_id=kinds.client_id)`.
    """
    for _ in range(LIMITED_CLAIM_TRIES):
        rows = await _fetch_limited(
            conn,
            queue_id,
            keyed=keyed,
            limit=limit,
            lease_s=lease_s,
            worker_id=worker_id,
            kinds=kinds,
            skip_durable=skip_durable,
        )
        if not (rows and rows[-1]["_conflict"]):
            return _claimed(rows)
    return []  # claimed by others meanwhile; the next round tries again


async def _fetch_limited(
    conn: Any,
    queue_id: int,
    *,
    keyed: bool,
    limit: int,
    lease_s: float,
    worker_id: UUID,
    kinds: KindsFilter | None,
    skip_durable: bool,
) -> list[Any]:
    if keyed:
        if kinds is None:
            return list(
                await conn.fetch(
                    CLAIM_KEYED,
                    queue_id,
                    limit,
                    lease_s,
                    worker_id,
                    None,
                    keys_per_claim(limit),
                    skip_durable,
                )
            )
        return list(
            await conn.fetch(
                CLAIM_KEYED_KINDS, queue_id, limit, lease_s, worker_id, kinds.kinds, keys_per_claim(limit)
            )
        )
    if kinds is None:
        return list(await conn.fetch(CLAIM_LIMITED, queue_id, limit, lease_s, worker_id, skip_durable))
    return list(await conn.fetch(CLAIM_LIMITED_KINDS, queue_id, limit, lease_s, worker_id, kinds.kinds))


# --- staging -------------------------------------------------------------------------------------

# Scheduled and retryable tasks whose time has come become available (index: tasks_due). Runs in
# every worker's poll tick; SKIP LOCKED keeps concurrent stagers out of each other's way.
STAGE_DUE = f"""
WITH due AS (
    SELECT id FROM tasks
    WHERE status IN ('scheduled', 'retryable') AND run_at <= now()
    ORDER BY run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
staged AS (
    UPDATE tasks t SET status = 'available'
    WHERE t.id = ANY(ARRAY(SELECT id FROM due)) AND t.status IN ('scheduled', 'retryable')
    RETURNING t.id, t.queue_id
),
{notify_queues("woken", "SELECT queue_id FROM staged")}
SELECT count(*) AS staged, (SELECT n FROM woken) AS _woken FROM staged
"""


async def stage_due(conn: Executor, *, limit: int = 5000) -> int:
    rows = await conn.fetch(STAGE_DUE, limit)
    return int(rows[0]["staged"])


# --- heartbeat, completion, release --------------------------------------------------------------

HEARTBEAT = """
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $2)
WHERE id = ANY($1::uuid[]) AND status = 'running' AND worker_id = $3
RETURNING id, cancel_requested, attempts, lease_expires_at
"""


async def heartbeat(
    conn: Executor, *, task_ids: list[UUID], lease_s: float, worker_id: UUID
) -> dict[UUID, bool]:
    """Extend the leases this worker still holds; returns {task id: cancel requested}."""
    rows = await heartbeat_rows(conn, task_ids=task_ids, lease_s=lease_s, worker_id=worker_id)
    return {row["id"]: row["cancel_requested"] for row in rows}


async def heartbeat_rows(
    conn: Executor, *, task_ids: list[UUID], lease_s: float, worker_id: UUID
) -> Sequence[Mapping[str, Any]]:
    """The same heartbeat, answering each renewed lease: id, cancel_requested, attempts, lease_expires_at."""
    return await conn.fetch(HEARTBEAT, task_ids, lease_s, worker_id)


async def cancels_requested(conn: Executor, *, task_ids: list[UUID], worker_id: UUID) -> list[UUID]:
    """Which of the tasks this worker runs a client asked to cancel: a read, for where no NOTIFY
    on the cancel channel can arrive (no LISTEN connection)."""
    rows = await conn.fetch(
        "SELECT id FROM tasks WHERE id = ANY($1::uuid[]) AND status = 'running' AND worker_id = $2 "
        "AND cancel_requested",
        task_ids,
        worker_id,
    )
    return [row["id"] for row in rows]


# Finish many attempts in one statement: the status the worker decided (via the state machine),
# the attempt record, and the events NOTIFY. The guard is a compare-and-set per row: the status the
# worker expects (running), the same attempt and the same worker; it drops a completion whose lease
# was rescued meanwhile, since that attempt no longer owns the task. Rows are reached through the
# primary key; the expected status and the worker come in with each row, so they are join
# conditions and not constants: as a constant, `worker_id = $n` looked so selective to the planner
# that it would nest a loop over the whole input for every task (quadratic in the batch size)
# instead of the merge join it picks for a join condition.
# A refunded completion (a deferral: the handler could not start) gives the attempt back and
# writes no attempt record.
# What ends an attempt that does not finish its task (a failure to retry, a deferral, a lost lease,
# a hand-back, a hand-off to an external provider, a durable suspension), wherever it is written:
# - a task whose cancel was requested while it ran never goes back to wait for another run: it
#   ends cancelled;
# - a task of a remote kind (its run was held by a remote worker) that its client deleted while it
#   ran can never be claimed again (no worker may claim a kind its client does not have; the delete
#   discarded the tasks of it that were not running, DELETE_KIND): it ends discarded, with the
#   delete's error (ended_error). A kind registered again meanwhile is there, and the task goes on.
#   Made only for such an end (a success costs nothing), with primary-key probes: whether the
#   holder is a remote worker (workers), then whether the kind is still there (remote_kinds). A
#   statement that ends the runs of one worker names it as `holder` (a parameter): its probe is
#   then made once per statement, not once per row, and in-process runs pay nothing more.
# Its attempt keeps its own outcome. `status` is the SQL of the status the attempt's end would give
# it; the updated `tasks` is aliased `t`, whose columns in SET are those of the row before the update
# (its worker_id the run's holder).
_UNFINISHED = "('retryable', 'available', 'waiting', 'scheduled')"


def _kind_deleted(holder: str) -> str:
    return (
        f"EXISTS (SELECT 1 FROM workers w WHERE w.id = {holder} AND w.remote) "
        "AND NOT EXISTS (SELECT 1 FROM remote_kinds r WHERE r.client_id = t.client_id AND r.name = t.kind)"
    )


def kind_deleted_error(kind: str) -> str:
    """The SQL of the error a task of the deleted remote kind `kind` (SQL) is discarded with."""
    return f"'remote kind ' || {kind} || ' was deleted; no worker can run this task'"


def ended_status(status: str, *, holder: str = "t.worker_id") -> str:
    return (
        f"CASE WHEN {status} NOT IN {_UNFINISHED} THEN {status} "
        f"WHEN t.cancel_requested THEN 'cancelled' "
        f"WHEN {_kind_deleted(holder)} THEN 'discarded' ELSE {status} END"
    )


def ended_error(status: str, error: str, *, holder: str = "t.worker_id") -> str:
    """The SQL of `last_error` at the same end: `error`, unless ended_status discards the task
    because its kind was deleted."""
    return (
        f"CASE WHEN {status} IN {_UNFINISHED} AND NOT t.cancel_requested AND {_kind_deleted(holder)} "
        f"THEN {kind_deleted_error('t.kind')} ELSE {error} END"
    )


# the status and error an attempt's end gives its task; every row's holder is the worker ($12)
_COMPLETED_STATUS = ended_status("i.status", holder="$12::uuid")
_COMPLETED_ERROR = ended_error("i.status", "COALESCE(i.error, t.last_error)", holder="$12::uuid")
COMPLETE = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::jsonb[], $5::text[], $6::float8[],
                         $7::timestamptz[], $8::timestamptz[], $9::int[], $10::text[], $11::jsonb[],
                         $13::text[], $14::boolean[], $15::text[])
        AS i(id, attempt, status, result, error, retry_in_s, started_at, finished_at, http_status,
             outcome, state, expected, refund, traceback),
        (SELECT $12::uuid AS worker) w
),
done AS (
    UPDATE tasks t
    SET status = {_COMPLETED_STATUS},
        attempts = CASE WHEN i.refund THEN t.attempts - 1 ELSE t.attempts END,
        result = CASE WHEN i.status = 'completed' THEN i.result
                      WHEN i.status = 'waiting' THEN i.state ELSE t.result END,
        -- a completed task carries no error from an earlier attempt (its attempts keep theirs)
        last_error = CASE WHEN i.status = 'completed' THEN NULL
                          ELSE {_COMPLETED_ERROR} END,
        run_at = CASE WHEN i.retry_in_s IS NOT NULL
                      THEN now() + make_interval(secs => i.retry_in_s) ELSE t.run_at END,
        finished_at = CASE WHEN {_COMPLETED_STATUS} IN ('completed', 'discarded', 'cancelled')
                           THEN now() END,
        lease_expires_at = NULL,
        worker_id = NULL
    FROM input i
    WHERE t.id = ANY($1::uuid[]) AND t.id = i.id
      AND t.status = i.expected AND t.attempts = i.attempt AND t.worker_id = i.worker
    RETURNING t.id, t.queue_id, t.queue, t.kind, t.status, i.outcome
),
recorded AS (
    INSERT INTO task_attempts
        (task_id, attempt, started_at, finished_at, outcome, http_status, error, duration_ms, traceback)
    SELECT i.id, i.attempt, i.started_at, i.finished_at, i.outcome, i.http_status, i.error,
           EXTRACT(epoch FROM i.finished_at - i.started_at) * 1000, i.traceback
    FROM input i JOIN done d ON d.id = i.id
    WHERE NOT i.refund
),
{notify_events("done")},
{_notify_room("done")}
SELECT done.*, (SELECT n FROM notified) AS _notified, (SELECT n FROM room) AS _room FROM done
"""


# The common case, a batch in which every attempt succeeded, with five arrays instead of twelve:
# the same guard, attempt record and NOTIFY as COMPLETE.
COMPLETE_SUCCESSES = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::jsonb[], $4::timestamptz[], $5::timestamptz[], $7::text[])
        AS i(id, attempt, result, started_at, finished_at, expected),
        (SELECT $6::uuid AS worker) w
),
done AS (
    UPDATE tasks t
    SET status = 'completed', result = i.result, finished_at = now(), last_error = NULL,
        lease_expires_at = NULL, worker_id = NULL
    FROM input i
    WHERE t.id = ANY($1::uuid[]) AND t.id = i.id
      AND t.status = i.expected AND t.attempts = i.attempt AND t.worker_id = i.worker
    RETURNING t.id, t.queue_id, t.queue, t.kind, t.status, 'completed' AS outcome
),
recorded AS (
    INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, duration_ms)
    SELECT i.id, i.attempt, i.started_at, i.finished_at, 'completed',
           EXTRACT(epoch FROM i.finished_at - i.started_at) * 1000
    FROM input i JOIN done d ON d.id = i.id
),
{notify_events("done")},
{_notify_room("done")}
SELECT done.*, (SELECT n FROM notified) AS _notified, (SELECT n FROM room) AS _room FROM done
"""


@record
class Completion:
    id: UUID
    attempt: int
    status: Status
    outcome: str
    started_at: datetime
    finished_at: datetime
    result: Any = None
    error: str | None = None
    retry_in_s: float | None = None
    http_status: int | None = None
    state: dict[str, Any] | None = None  # provider state of a task that goes to `waiting`
    refund: bool = False  # a deferral: the attempt did not happen
    traceback: str | None = None  # a Python failure's, bounded to 8 KiB; only on failures


async def complete(
    conn: Executor, completions: Sequence[Completion], *, worker_id: UUID
) -> list[Mapping[str, Any]]:
    if all(c.status is Status.COMPLETED and c.http_status is None and not c.refund for c in completions):
        return list(
            await conn.fetch(
                COMPLETE_SUCCESSES,
                [c.id for c in completions],
                [c.attempt for c in completions],
                [None if c.result is None else json_text.dumps(c.result) for c in completions],
                [c.started_at for c in completions],
                [c.finished_at for c in completions],
                worker_id,
                [str(Status.RUNNING)] * len(completions),
            )
        )
    rows = await conn.fetch(
        COMPLETE,
        [c.id for c in completions],
        [c.attempt for c in completions],
        [str(c.status) for c in completions],
        [None if c.result is None else json_text.dumps(c.result) for c in completions],
        [c.error for c in completions],
        [c.retry_in_s for c in completions],
        [c.started_at for c in completions],
        [c.finished_at for c in completions],
        [c.http_status for c in completions],
        [c.outcome for c in completions],
        [None if c.state is None else json_text.dumps(c.state) for c in completions],
        worker_id,
        [str(Status.RUNNING)] * len(completions),
        [c.refund for c in completions],
        [c.traceback for c in completions],
    )
    return list(rows)


# Shutdown: tasks this worker could not finish in its grace period go back to available. The
# attempt did not fail, so it is not counted. One whose cancel was requested while it ran ends
# cancelled instead, as at any other end of an attempt that did not finish it (ended_status):
# released, it was claimed and run again. A run is named by its task, attempt and worker, as a
# completion is: a hand-back that comes late (a remote claim's answer abandoned at its lease) must
# not release a later run of the task, rescued meanwhile and claimed again by the same worker.
_RELEASED_STATUS = ended_status("'available'", holder="$3::uuid")
RELEASE = f"""
WITH given AS (
    SELECT * FROM unnest($1::uuid[], $2::int[]) AS g(id, attempt)
),
released AS (
    UPDATE tasks t SET status = {_RELEASED_STATUS}, attempts = t.attempts - 1,
                       started_at = NULL, lease_expires_at = NULL, worker_id = NULL,
                       finished_at = CASE WHEN {_RELEASED_STATUS} <> 'available' THEN now() END,
                       last_error = {ended_error("'available'", "t.last_error", holder="$3::uuid")}
    FROM given g
    WHERE t.id = g.id AND t.attempts = g.attempt AND t.status = 'running' AND t.worker_id = $3
    RETURNING t.id, t.queue_id, t.status
),
{notify_queues("woken", "SELECT queue_id FROM released WHERE status = 'available'")},
{notify_events("released")}
SELECT id, (SELECT n FROM woken) + (SELECT n FROM notified) AS _woken FROM released
"""


async def release(conn: Executor, runs: Sequence[ClaimedTask], *, worker_id: UUID) -> list[UUID]:
    """Hand these runs back: available again, their attempts not counted."""
    ids = [run.id for run in runs]
    attempts = [run.attempt for run in runs]
    return [row["id"] for row in await conn.fetch(RELEASE, ids, attempts, worker_id)]


# Progress is the running attempt's, guarded as its completion is (status, attempt and worker): a
# released attempt is given back, so the next run of the task may carry the same number.
PROGRESS = f"""
WITH updated AS (
    UPDATE tasks SET progress = $3::jsonb
    WHERE id = $1 AND attempts = $2 AND status = 'running' AND worker_id = $4
    RETURNING id
)
SELECT id, (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) FROM updated) AS _n FROM updated
"""


async def set_progress(
    conn: Executor, *, task_id: UUID, attempt: int, worker_id: UUID, progress: dict[str, Any]
) -> None:
    await conn.fetch(PROGRESS, task_id, attempt, json_text.dumps(progress), worker_id)


# A heartbeat's progress reports in one statement (one per task was a round trip each, and the
# heartbeat's answer waited for all of them), in id order, as the other batch writes lock rows.
PROGRESS_MANY = f"""
WITH given AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[]) AS g(id, attempt, worker, progress)
),
updated AS (
    UPDATE tasks t SET progress = g.progress::jsonb
    FROM given g
    WHERE t.id = g.id AND t.attempts = g.attempt AND t.status = 'running' AND t.worker_id = g.worker
    RETURNING t.id
)
SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) AS n FROM updated
"""


async def set_progress_many(conn: Executor, reports: list[tuple[UUID, int, UUID, dict[str, Any]]]) -> None:
    """Store each (task id, attempt, worker, progress) of a running attempt; stale ones change
    nothing."""
    if not reports:
        return
    ordered = sorted(reports, key=lambda report: report[0])
    await conn.fetch(
        PROGRESS_MANY,
        [task_id for task_id, _, _, _ in ordered],
        [attempt for _, attempt, _, _ in ordered],
        [worker_id for _, _, worker_id, _ in ordered],
        [json_text.dumps(progress) for _, _, _, progress in ordered],
    )


# --- rescue --------------------------------------------------------------------------------------

# Leases that expired: the worker died, stalled or fenced itself. The rescuer locks a batch of them
# (index: tasks_lease, running rows only), the engine's failure policy decides each one's fate in
# Python (app/src/api/engine/outcomes.py, the same policy as a failed attempt in a worker), and one
# guarded UPDATE writes them. The guard re-checks status, lease, attempt and worker on the locked
# row, so a task that completed between the pick and the update is left alone (River #1302). The
# lost attempt is recorded.
# The host permits the rescued attempts hold (the `http` kind's: holder = worker id, task_id = the
# task) are freed in the same statement: otherwise they would block their destinations until their
# own, longer leases end. Only those: the worker's other requests may hold valid leases (one claimed
# after its last successful heartbeat), and freeing their permits would let a host's limit be
# exceeded. A slot handed off between two requests of one process keeps the task that took it
# from the database; it is freed with that one's rescue, or else ends with its own lease.
# (http_host_permits is a few rows per destination host: no index is needed.)
EXPIRED_LEASES = """
SELECT t.id, t.attempts, t.max_attempts, t.worker_id, q.min_backoff_s, q.max_backoff_s,
       t.attempts_before_retry
FROM tasks t JOIN queues q ON q.id = t.queue_id
WHERE t.status = 'running' AND t.lease_expires_at < now()
ORDER BY t.lease_expires_at
LIMIT $1
FOR UPDATE OF t SKIP LOCKED
"""

_LEASE_EXPIRED = "'lease expired: the worker stopped renewing it (attempt ' || t.attempts || ')'"
RESCUE_EXPIRED = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::float8[], $6::uuid[])
        AS i(id, attempt, status, retry_in_s, worker)
),
rescued AS (
    UPDATE tasks t
    SET status = {ended_status("i.status")},
        last_error = {ended_error("i.status", _LEASE_EXPIRED)},
        run_at = CASE WHEN i.retry_in_s IS NOT NULL
                      THEN now() + make_interval(secs => i.retry_in_s) ELSE t.run_at END,
        finished_at = CASE WHEN {ended_status("i.status")} IN ('discarded', 'cancelled') THEN now() END,
        lease_expires_at = NULL,
        worker_id = NULL
    FROM input i
    WHERE t.id = ANY($1::uuid[]) AND t.id = i.id
      AND t.status = 'running' AND t.lease_expires_at < now() AND t.attempts = i.attempt
      AND t.worker_id IS NOT DISTINCT FROM i.worker
    RETURNING t.id, t.attempts, t.started_at, t.status, t.queue, t.kind
),
recorded AS (
    INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, error, duration_ms)
    SELECT id, attempts, COALESCE(started_at, now()), now(), $5, 'lease expired',
           EXTRACT(epoch FROM now() - COALESCE(started_at, now())) * 1000
    FROM rescued
),
permits_freed AS (
    UPDATE http_host_permits p SET holder = NULL, task_id = NULL, expires_at = now()
    FROM input i JOIN rescued r ON r.id = i.id
    WHERE p.holder = i.worker AND p.task_id = r.id AND p.expires_at > now()
    RETURNING host
),
{notify_events("rescued")}
SELECT rescued.*, (SELECT n FROM notified) AS _notified,
       (SELECT count(*) FROM permits_freed) AS _permits_freed
FROM rescued
"""


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    id: UUID
    attempt: int
    max_attempts: int
    worker_id: UUID | None
    min_backoff_s: float
    max_backoff_s: float
    retry_base: int = 0  # attempts_before_retry (outcomes.after_failure)


class RescueDecision(Protocol):
    def __call__(self, lease: ExpiredLease) -> tuple[Status, float | None]: ...


async def rescue_expired(
    conn: Any, *, decide: RescueDecision, outcome: str, limit: int = 1000
) -> list[Mapping[str, Any]]:
    """Rescue up to `limit` expired leases; `decide` gives each its (status, retry_in_s).

    `conn` is an asyncpg connection (this opens a transaction: the rows stay locked between the
    pick and the update).
    """
    async with conn.transaction():
        rows = await conn.fetch(EXPIRED_LEASES, limit)
        if not rows:
            return []
        leases = [ExpiredLease(r["id"], r["attempts"], r["max_attempts"], r["worker_id"],
                               r["min_backoff_s"], r["max_backoff_s"], r["attempts_before_retry"])
                  for r in rows]  # fmt: skip
        decisions = [decide(lease) for lease in leases]
        return list(
            await conn.fetch(
                RESCUE_EXPIRED,
                [lease.id for lease in leases],
                [lease.attempt for lease in leases],
                [str(status) for status, _ in decisions],
                [retry_in_s for _, retry_in_s in decisions],
                outcome,
                [lease.worker_id for lease in leases],
            )
        )


# --- reading and client actions ------------------------------------------------------------------


async def traceparents(conn: Executor, task_ids: Sequence[UUID]) -> dict[UUID, str]:
    """The trace context each task was enqueued in, where one was kept (primary key lookups)."""
    rows = await conn.fetch(
        "SELECT id, traceparent FROM tasks WHERE id = ANY($1::uuid[]) AND traceparent IS NOT NULL",
        list(task_ids),
    )
    return {row["id"]: row["traceparent"] for row in rows}


async def get_task(conn: Executor, *, client_id: UUID, task_id: UUID) -> Task | None:
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND client_id = $2", task_id, client_id
    )
    return to_task(rows[0]) if rows else None


async def get_tasks(conn: Executor, *, client_id: UUID, task_ids: list[UUID]) -> list[Task]:
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1::uuid[]) AND client_id = $2",
        task_ids,
        client_id,
    )
    by_id = {row["id"]: to_task(row) for row in rows}
    return [by_id[task_id] for task_id in task_ids if task_id in by_id]


# Keyset pagination over tasks_client (client_id, id): ids are UUIDv7, so newest first is id DESC
# and the cursor is the last id seen.
LIST_TASKS = f"""
SELECT {TASK_COLUMNS} FROM tasks
WHERE client_id = $1
  AND ($2::uuid IS NULL OR id < $2)
  AND ($3::text IS NULL OR queue = $3)
  AND ($4::text IS NULL OR status = $4)
  AND ($5::text IS NULL OR kind = $5)
ORDER BY id DESC
LIMIT $6
"""


async def list_tasks(
    conn: Executor,
    *,
    client_id: UUID,
    before: UUID | None,
    queue: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
) -> list[Task]:
    rows = await conn.fetch(LIST_TASKS, client_id, before, queue, status, kind, limit)
    return [to_task(row) for row in rows]


async def list_attempts(
    conn: Executor, *, task_id: UUID, after: int | None = None, limit: int | None = None
) -> list[Attempt]:
    """A task's attempts in the order they ended; `after` (a `seq`) and `limit` make a keyset page
    (index task_attempts_task (task_id, id))."""
    rows = await conn.fetch(
        "SELECT attempt, started_at, finished_at, outcome, http_status, error, duration_ms, traceback, "
        "id AS seq FROM task_attempts WHERE task_id = $1 AND ($2::bigint IS NULL OR id > $2) "
        "ORDER BY id LIMIT $3",
        task_id,
        after,
        limit,
    )
    return [dacite.from_dict(Attempt, dict(row), config=_DACITE) for row in rows]


# What a cancel does, in each of them (one task, the bulk cancel, a cancelled parent's children,
# and the row trigger of migration 0008, which keeps its own copy as migrations do): waiting,
# scheduled, available and retryable tasks are cancelled at once; a running task keeps running
# with cancel_requested, which its worker sees at the next heartbeat and passes to the handler.
# The updated `tasks` is aliased `t`.
CANCELLING = """status = CASE WHEN t.status = 'running' THEN t.status ELSE 'cancelled' END,
        finished_at = CASE WHEN t.status = 'running' THEN t.finished_at ELSE now() END,
        waiting_for = CASE WHEN t.status = 'running' THEN t.waiting_for END,
        cancel_requested = true"""

CANCEL = f"""
WITH changed AS (
    UPDATE tasks t
    SET {CANCELLING}
    WHERE id = $1 AND client_id = $2 AND status = ANY($3::text[])
    RETURNING {TASK_COLUMNS}
)
SELECT changed.*,
       (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) + count(pg_notify('{CANCEL_CHANNEL}', id::text))
        FROM changed) AS _n
FROM changed
"""


async def cancel(conn: Executor, *, client_id: UUID, task_id: UUID) -> Task | None:
    rows = await conn.fetch(CANCEL, task_id, client_id, sources(Status.CANCELLED))
    return to_task(rows[0]) if rows else None


# What a retry by hand does (one task, and the bulk retry): the task is available again with as
# many attempts ahead of it as it was created with. Its attempt count goes on, never back to 0:
# the attempt number is what fences a completion (status running, same attempt, same worker), so
# a number used twice would let a worker that lost an earlier run's lease, and then claimed the
# retried task, have its stale report of that run accepted for the new one. The budget is
# max_attempts minus the attempts used before the last retry; max_attempts moves on by it.
# A task with dependencies waits again for those that have not completed (it was cancelled when
# one failed, or while they ran), and is not retried while one of them is discarded or cancelled:
# retry that one first. Their statuses come from `deps` (RETRY_DEPENDENCIES), read under a share
# lock so that none can finish between the count and the write unseen by the trigger.
# A retried task is debounced no more: one cancelled before it started still had its debounce key,
# and back among pending tasks beside a newer one holding that key, it broke tasks_debounce (a
# 500, and every bulk retry of a filter that matched it).
# The updated `tasks` is aliased `t`.
RETRY_DEPENDENCIES = """
    SELECT x.task_id, d.id, d.status FROM task_dependencies x JOIN tasks d ON d.id = x.depends_on_id
    WHERE x.task_id = ANY({ids})
    FOR SHARE OF d"""
_OPEN_DEPENDENCIES = (
    "SELECT {what} FROM deps WHERE deps.task_id = t.id "
    "AND deps.status NOT IN ('completed', 'discarded', 'cancelled')"
)
RETRYING = f"""status = CASE WHEN EXISTS ({_OPEN_DEPENDENCIES.format(what="1")}) THEN 'waiting'
                      ELSE 'available' END,
        waiting_for = CASE WHEN EXISTS ({_OPEN_DEPENDENCIES.format(what="1")})
                           THEN jsonb_build_object('type', 'dependencies', 'task_ids',
                                ({_OPEN_DEPENDENCIES.format(what="jsonb_agg(deps.id::text)")})) END,
        deps_open = ({_OPEN_DEPENDENCIES.format(what="count(*)")}),
        run_at = now(), started_at = NULL, finished_at = NULL,
        cancel_requested = false, result = NULL, progress = NULL, debounce_key = NULL,
        max_attempts = t.attempts + (t.max_attempts - t.attempts_before_retry),
        attempts_before_retry = t.attempts"""
NO_FAILED_DEPENDENCY = """NOT EXISTS (
        SELECT 1 FROM deps WHERE deps.task_id = t.id AND deps.status IN ('discarded', 'cancelled'))"""
# The same refusal when tasks are picked for a bulk retry (the guard above holds it under the lock):
# picked and then refused, they would stop every later chunk short. `tasks` is not aliased there.
RETRY_REFUSED = """(tasks.depends_on IS NOT NULL AND EXISTS (
        SELECT 1 FROM task_dependencies x JOIN tasks d ON d.id = x.depends_on_id
        WHERE x.task_id = tasks.id AND d.status IN ('discarded', 'cancelled')))"""

RETRY = f"""
WITH deps AS ({RETRY_DEPENDENCIES.format(ids="ARRAY[$1::uuid]")}
),
changed AS (
    UPDATE tasks t
    SET {RETRYING}
    WHERE id = $1 AND client_id = $2 AND status = ANY($3::text[]) AND {NO_FAILED_DEPENDENCY}
    RETURNING {TASK_COLUMNS}
),
woken AS (SELECT count(pg_notify('{AVAILABLE_CHANNEL}', queue_id::text)) AS n FROM changed),
evented AS (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) AS n FROM changed)
SELECT changed.*, (SELECT n FROM woken) + (SELECT n FROM evented) AS _n FROM changed
"""


async def retry(conn: Executor, *, client_id: UUID, task_id: UUID, from_statuses: list[str]) -> Task | None:
    rows = await conn.fetch(RETRY, task_id, client_id, from_statuses)
    return to_task(rows[0]) if rows else None


async def count_unfinished(conn: Executor, *, client_id: UUID) -> int:
    """Unfinished tasks of a client (index: tasks_queue_status over the client's queues)."""
    rows = await conn.fetch(
        "SELECT count(*) AS n FROM tasks WHERE queue_id IN (SELECT id FROM queues WHERE client_id = $1) "
        "AND status IN ('scheduled', 'available', 'running', 'waiting', 'retryable')",
        client_id,
    )
    return int(rows[0]["n"])


async def client_quotas(conn: Executor, client_ids: Sequence[UUID]) -> dict[UUID, int | None]:
    """Each API client's own `max_queued_tasks` (None: the deployment default); unknown ids are absent."""
    rows = await conn.fetch(
        "SELECT id, max_queued_tasks FROM api_clients WHERE id = ANY($1::uuid[])", list(client_ids)
    )
    return {row["id"]: row["max_queued_tasks"] for row in rows}
