"""Storage of durable composition: steps, signals, children, dependencies and suspensions.

A task that uses none of this is never touched here: the claim returns its `durable` flag, and
only flagged tasks have their state loaded (LOAD_STATE, one statement for a whole claim). Every
write is guarded like a completion (status running, same attempt, same worker), and what a
suspension produced — its steps, its children, the parent's new status — is written in one
transaction. What the end of a child or a dependency means for others is decided by the trigger
`taskgate_composition_changed` (migrations 0008, 0014), in the transaction that ended it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from app.database import is_connection_failure
from app.src.api.models.tasks import Task
from app.src.database.tasks import (
    AVAILABLE_CHANNEL,
    CANCEL_CHANNEL,
    CANCELLING,
    EVENTS_CHANNEL,
    TASK_COLUMNS,
    Executor,
    NewTask,
    ended_error,
    ended_status,
    notify_queues,
    to_task,
)
from app.src.utils import json_text

MAX_STEPS = 1000
MAX_CHILDREN = 10_000
# What a task may hold in all: every claim of it loads its steps and signals into the worker (a
# remote claim's answer carries them), and GET /api/tasks/{id}/steps reads them. Counted in
# `tasks.state_bytes` (migration 0016) as the compact JSON of each step result and signal data,
# by the statements that store them; a sleep's or signal wait's own record (a few bytes) is not.
MAX_STATE_BYTES = 16 * 1024 * 1024
# Signals kept that no wait has received yet: only a wait (itself one of MAX_STEPS) receives one.
MAX_PENDING_SIGNALS = 1000
# What one claim round loads (in-process and remote alike): the durable tasks claimed past it are
# handed back (available again at once, the attempt not counted), the first one always loads.
MAX_CLAIM_STATE_BYTES = 4 * MAX_STATE_BYTES


@dataclass(frozen=True, slots=True)
class DurableState:
    """What a claimed durable task's handler replays: {name: result}, {name: data}, {key: child}."""

    steps: dict[str, Any] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    children: dict[str, dict[str, Any]] = field(default_factory=dict)
    waits: frozenset[str] = frozenset()  # the names in `steps` that are sleeps' and signal waits' records
    size: int = 0  # what it counts toward a claim's budget (SIZE_STATES)


# One statement for every durable task of a claim. Steps come back as stored, except that a sleep
# (a wait record, flagged as such: a step's result may hold any keys) says whether it is over
# (`done`, by the database's clock: workers' clocks do not decide). A signal whose wait already
# timed out is not delivered to it (the handler saw SignalTimeout, and a replay must see the
# same). Children by key (index: tasks_parent_key).
LOAD_STATE = """
SELECT t.id,
       (SELECT COALESCE(jsonb_object_agg(s.name,
                  CASE WHEN s.wait AND s.result ? 'sleep_until'
                       THEN s.result || jsonb_build_object(
                           'done', (s.result->>'sleep_until')::timestamptz <= now())
                       ELSE s.result END), '{}'::jsonb)
        FROM task_steps s WHERE s.task_id = t.id) AS steps,
       (SELECT COALESCE(jsonb_object_agg(g.name, g.data), '{}'::jsonb)
        FROM task_signals g WHERE g.task_id = t.id
          AND NOT EXISTS (SELECT 1 FROM task_steps w WHERE w.task_id = t.id AND w.name = g.name
                          AND w.wait AND (w.result->>'timed_out')::boolean)) AS signals,
       (SELECT COALESCE(jsonb_object_agg(c.child_key,
                  jsonb_build_object('id', c.id, 'status', c.status, 'result', c.result,
                                     'error', c.last_error)),
                  '{}'::jsonb)
        FROM tasks c WHERE c.parent_id = t.id) AS children,
       ARRAY(SELECT s.name FROM task_steps s WHERE s.task_id = t.id AND s.wait) AS waits
FROM unnest($1::uuid[]) AS t(id)
"""


# What each durable task of a claim would load — its steps and signals (state_bytes) and its
# children's results and errors, which a gather replays (counted here, as their JSON text: a child's
# result is up to MAX_RESULT_BYTES, a parent has up to MAX_CHILDREN) — and which of them fit in
# the budget $2, in the claim's order (the first always when $4). A task past $3 (MAX_STATE_BYTES)
# in all is answered whatever the budget and counts nothing toward it: it is not loaded, it fails.
SIZE_STATES = """
SELECT id, size FROM (
    SELECT t.id, i.n, s.size,
           sum(CASE WHEN s.size > $3 THEN 0 ELSE s.size END) OVER (ORDER BY i.n) AS total
    FROM unnest($1::uuid[]) WITH ORDINALITY AS i(id, n) JOIN tasks t ON t.id = i.id
    CROSS JOIN LATERAL (
        SELECT t.state_bytes + COALESCE((
            SELECT sum(COALESCE(octet_length(c.result::text), 0) + COALESCE(octet_length(c.last_error), 0))
            FROM tasks c WHERE c.parent_id = t.id), 0)::bigint AS size
    ) s
) sized
WHERE n = 1 AND $4 OR total <= $2 OR size > $3
"""


def too_large(size: int) -> str:
    return (
        f"its stored state and its children's results come to {size} bytes, past the"
        f" {MAX_STATE_BYTES} a task may load to replay: have its children return less (store large"
        " data elsewhere and return a reference to it), or gather fewer children in one task"
    )


async def load_state(conn: Executor, task_ids: Sequence[UUID]) -> dict[UUID, DurableState]:
    if not task_ids:
        return {}
    rows = await conn.fetch(LOAD_STATE, list(task_ids))
    return {
        row["id"]: DurableState(
            steps=row["steps"],
            signals=row["signals"],
            children=row["children"],
            waits=frozenset(row["waits"]),
        )
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class Unloadable:
    """A durable task's stored state that PostgreSQL could not load: the task cannot replay, so its
    attempt fails with this error (retried by its queue's policy) instead of running. `permanent`:
    a state past what a task may load (MAX_STATE_BYTES with its children's results), which no
    retry would change: the task fails for good."""

    error: str
    permanent: bool = False


async def load_claimed_states(
    conn: Executor, task_ids: Sequence[UUID], *, budget: int = MAX_CLAIM_STATE_BYTES, first: bool = True
) -> dict[UUID, DurableState | Unloadable]:
    """The stored state of a claim's durable tasks, as far as `budget` goes (the first task always
    when `first`): a task missing from the answer was left out (the caller hands it back), so that
    one claim round never loads a worker's (or a remote claim's answer's) worth of states past that
    bound. A task whose state with its children's results is past MAX_STATE_BYTES is answered
    Unloadable (permanent), never loaded."""
    sizes = await claimed_sizes(conn, task_ids, budget=budget, first=first)
    return await load_sized_states(conn, [task_id for task_id in task_ids if task_id in sizes], sizes)


async def claimed_sizes(
    conn: Executor, task_ids: Sequence[UUID], *, budget: int = MAX_CLAIM_STATE_BYTES, first: bool = True
) -> dict[UUID, int]:
    """What the states of a claim's durable tasks come to (SIZE_STATES), for those within `budget`
    in claim order (the first always when `first`) and those past MAX_STATE_BYTES."""
    if not task_ids:
        return {}
    rows = await conn.fetch(SIZE_STATES, list(task_ids), budget, MAX_STATE_BYTES, first)
    return {row["id"]: int(row["size"]) for row in rows}


def loadable(size: int) -> bool:
    return size <= MAX_STATE_BYTES


async def load_sized_states(
    conn: Executor, task_ids: Sequence[UUID], sizes: Mapping[UUID, int]
) -> dict[UUID, DurableState | Unloadable]:
    """The states of `task_ids`, sized by claimed_sizes: those past MAX_STATE_BYTES are answered
    Unloadable (permanent), never loaded."""
    states: dict[UUID, DurableState | Unloadable] = {
        task_id: Unloadable(too_large(sizes[task_id]), permanent=True)
        for task_id in task_ids
        if not loadable(sizes[task_id])
    }
    loaded = await load_states(conn, [task_id for task_id in task_ids if loadable(sizes[task_id])])
    for task_id, state in loaded.items():
        states[task_id] = replace(state, size=sizes[task_id]) if isinstance(state, DurableState) else state
    return states


async def load_states(conn: Executor, task_ids: Sequence[UUID]) -> dict[UUID, DurableState | Unloadable]:
    """The stored state of a claim's durable tasks (in-process and remote claims alike), in one
    statement. The tasks are claimed already: if the statement fails on one task's state, the others
    are loaded one by one, so only that task fails its attempt (raised, the whole claim was left to
    its leases, or handed back, round after round while the bad one was claimed with it). A
    database out of reach is raised: no task's state is the cause, the caller hands the claim back."""
    try:
        return dict(await load_state(conn, task_ids))
    except asyncpg.PostgresError as exc:
        if is_connection_failure(exc):
            raise
        if len(task_ids) == 1:
            return {task_ids[0]: Unloadable(str(exc) or type(exc).__name__)}
    states: dict[UUID, DurableState | Unloadable] = {}
    for task_id in task_ids:
        states.update(await load_states(conn, [task_id]))
    return states


# --- steps (in-process workers) ------------------------------------------------------------------

# A step that succeeded, stored before the handler goes on, so a worker killed right after it never
# runs it again. Guarded by the attempt's lease (status, attempt, worker): a stale attempt stores
# nothing. The first step flags the task durable, so its next claims load what it stored. The
# task's row is locked (a signal counts its bytes under the same lock), so the bound is exact.
CHECKPOINT_STEP = f"""
WITH owner AS (
    SELECT id, durable, state_bytes FROM tasks
    WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3
    FOR UPDATE
),
counted AS (SELECT count(*) AS n FROM task_steps WHERE task_id = $1),
stored AS (
    INSERT INTO task_steps (task_id, name, result)
    SELECT id, $4, $5::jsonb FROM owner
    WHERE (SELECT n FROM counted) < {MAX_STEPS} AND owner.state_bytes + $6 <= {MAX_STATE_BYTES}
    ON CONFLICT (task_id, name) DO NOTHING
    RETURNING task_id
),
changed AS (
    UPDATE tasks t
    SET durable = true,
        state_bytes = t.state_bytes + CASE WHEN EXISTS (SELECT 1 FROM stored) THEN $6 ELSE 0 END
    FROM owner
    WHERE t.id = owner.id AND (NOT owner.durable OR EXISTS (SELECT 1 FROM stored))
    RETURNING t.id
)
SELECT (SELECT count(*) FROM owner) AS owned, (SELECT n FROM counted) AS steps,
       (SELECT state_bytes FROM owner) AS state_bytes,
       (SELECT count(*) FROM changed) AS _changed,
       (SELECT count(pg_notify('{EVENTS_CHANNEL}', task_id::text)) FROM stored) AS stored
"""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    owned: bool  # the attempt still holds the task
    over_limit: bool  # the task already holds MAX_STEPS steps
    over_bytes: bool = False  # the step would bring the task's state past MAX_STATE_BYTES
    state_bytes: int = 0  # what the task held before this step


async def checkpoint_step(
    conn: Executor, *, task_id: UUID, attempt: int, worker_id: UUID, name: str, result: Any
) -> Checkpoint:
    text = json_text.dumps(result)
    size = len(text.encode())
    rows = await conn.fetch(CHECKPOINT_STEP, task_id, attempt, worker_id, name, text, size)
    row = rows[0]
    owned = bool(row["owned"])
    held = int(row["state_bytes"] or 0)
    return Checkpoint(
        owned=owned,
        over_limit=owned and row["steps"] >= MAX_STEPS,
        over_bytes=owned and not row["stored"] and held + size > MAX_STATE_BYTES,
        state_bytes=held,
    )


# One page of a task's steps in the order they were stored (a task has at most MAX_STEPS: sorted
# in memory). A page ends at `limit` steps or before the step that would take its results past
# `max_bytes` (it always holds one), so no answer carries a whole state at once; `fetched` tells
# the caller whether steps follow.
LIST_STEPS = """
SELECT name, result, created_at, fetched FROM (
    SELECT name, result, created_at,
           sum(octet_length(result::text)) OVER (ORDER BY created_at, name) AS total,
           row_number() OVER (ORDER BY created_at, name) AS n,
           count(*) OVER () AS fetched
    FROM (
        SELECT name, result, created_at FROM task_steps
        WHERE task_id = $1 AND ($2::timestamptz IS NULL OR (created_at, name) > ($2, $3::text))
        ORDER BY created_at, name
        LIMIT $5 + 1
    ) first
) page
WHERE n = 1 OR total <= $4
ORDER BY created_at, name
"""


@dataclass(frozen=True, slots=True)
class StepPage:
    items: list[Mapping[str, Any]]
    more: bool  # steps follow the last item


async def list_steps(
    conn: Executor,
    *,
    task_id: UUID,
    after: tuple[datetime, str] | None = None,
    limit: int = MAX_STEPS,
    max_bytes: int = MAX_STATE_BYTES,
) -> StepPage:
    rows = list(
        await conn.fetch(
            LIST_STEPS, task_id, after[0] if after else None, after[1] if after else None, max_bytes, limit
        )
    )
    items = rows[:limit]
    return StepPage(items=items, more=bool(rows) and int(rows[0]["fetched"]) > len(items))


# --- suspension ----------------------------------------------------------------------------------

# The running attempt ends without a result; the task keeps everything it stored. Locked first
# (the guard), so the counts read next are exact for this transaction.
LOCK_RUNNING = """
SELECT (SELECT count(*) FROM task_steps s WHERE s.task_id = t.id) AS steps, t.state_bytes,
       (SELECT count(*) FROM tasks c WHERE c.parent_id = t.id) AS children
FROM tasks t
WHERE t.id = $1 AND t.status = 'running' AND t.attempts = $2 AND t.worker_id = $3
FOR UPDATE OF t
"""

# The task's row is locked already (LOCK_RUNNING): its state_bytes grows by what was stored.
INSERT_STEPS = f"""
WITH input AS (SELECT * FROM unnest($2::text[], $3::jsonb[], $4::bigint[]) AS i(n, r, b)),
stored AS (
    INSERT INTO task_steps (task_id, name, result)
    SELECT $1, n, r FROM input
    ON CONFLICT (task_id, name) DO NOTHING
    RETURNING name
),
counted AS (
    UPDATE tasks SET state_bytes = state_bytes
        + (SELECT COALESCE(sum(input.b), 0) FROM stored JOIN input ON input.n = stored.name)
    WHERE id = $1
)
SELECT count(*) AS n, (SELECT count(pg_notify('{EVENTS_CHANNEL}', $1::text))) AS _n FROM stored
"""

# A wait recorded as a step under its name the first time it is reached: a sleep's end and a
# signal's deadline are fixed then (by the database's clock) and kept across re-runs. `own` says
# whether the row under that name is a wait of this sort (flagged, holding key $3): a step's
# result, or a wait of the other sort, met here is a name used twice, not this wait's record.
RECORD_WAIT = """
WITH stored AS (
    INSERT INTO task_steps (task_id, name, result, wait)
    VALUES ($1, $2, jsonb_build_object($3::text, now() + make_interval(secs => $4::float8)), true)
    ON CONFLICT (task_id, name) DO NOTHING
    RETURNING result, wait
),
found AS (
    SELECT result, wait FROM stored
    UNION ALL
    SELECT result, wait FROM task_steps
    WHERE task_id = $1 AND name = $2 AND NOT EXISTS (SELECT 1 FROM stored)
)
SELECT (SELECT result FROM found) AS result,
       COALESCE((SELECT wait AND result ? $3::text FROM found), false) AS own, now() AS now
"""

SIGNAL_STORED = "SELECT 1 AS found FROM task_signals WHERE task_id = $1 AND name = $2"

# The parent's new life: `status` and `waiting_for` as decided (a wait for children becomes
# `available` at once when none is open any more, counted under the lock), its lease gone, its
# attempt recorded as suspended. A suspension is not a failure: max_attempts grows with it, so a
# task that suspends a hundred times keeps its whole failure budget (attempts still count up, so
# every completion guard stays exact), and so does the budget a retry by hand grants.
# A task whose cancel was requested while it ran is cancelled here instead of waiting for its next
# run (its steps and children are still stored: the children are then cancelled with it), and one
# whose remote kind was deleted while it ran is discarded (ended_status: the same rule as every
# other end of a run that does not finish its task).
_CHILDREN_DONE = "$4 = 'waiting' AND ($5::jsonb)->>'type' = 'children' AND t.children_open + $7 <= 0"
_SUSPENDED = f"CASE WHEN {_CHILDREN_DONE} THEN 'available' ELSE $4 END"
_ENDED = ended_status(_SUSPENDED, holder="$3::uuid")  # its holder is the worker ($3)
SUSPEND = f"""
WITH changed AS (
    UPDATE tasks t
    SET status = {_ENDED},
        waiting_for = CASE WHEN {_ENDED} IN ('cancelled', 'discarded') THEN NULL
                           WHEN {_CHILDREN_DONE} THEN NULL ELSE $5::jsonb END,
        finished_at = CASE WHEN {_ENDED} IN ('cancelled', 'discarded') THEN now()
                           ELSE t.finished_at END,
        last_error = {ended_error(_SUSPENDED, "t.last_error", holder="$3::uuid")},
        run_at = COALESCE($6::timestamptz, now()),
        children_open = t.children_open + $7,
        durable = true,
        max_attempts = t.max_attempts + 1,
        attempts_before_retry = t.attempts_before_retry + 1,
        lease_expires_at = NULL,
        worker_id = NULL
    WHERE t.id = $1 AND t.status = 'running' AND t.attempts = $2 AND t.worker_id = $3
    RETURNING t.id, t.queue_id, t.queue, t.kind, t.status, t.started_at
),
recorded AS (
    INSERT INTO task_attempts (task_id, attempt, started_at, finished_at, outcome, duration_ms)
    SELECT id, $2, COALESCE(started_at, now()), now(), 'suspended',
           EXTRACT(epoch FROM now() - COALESCE(started_at, now())) * 1000
    FROM changed
),
notified AS (
    SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text))
         + count(pg_notify('{AVAILABLE_CHANNEL}', queue_id::text))
           FILTER (WHERE status = 'available') AS n
    FROM changed
)
SELECT changed.*, (SELECT n FROM notified) AS _n FROM changed
"""


@dataclass(frozen=True, slots=True)
class Locked:
    """What a locked running task already holds: its stored steps and its children."""

    steps: int
    children: int
    state_bytes: int = 0  # its steps' and signals' bytes (MAX_STATE_BYTES)


async def lock_running(conn: Any, *, task_id: UUID, attempt: int, worker_id: UUID) -> Locked | None:
    row = await conn.fetchrow(LOCK_RUNNING, task_id, attempt, worker_id)
    if row is None:
        return None
    return Locked(row["steps"], row["children"], int(row["state_bytes"]))


async def insert_steps(conn: Any, *, task_id: UUID, steps: Mapping[str, Any]) -> None:
    if steps:
        texts = [json_text.dumps(value) for value in steps.values()]
        await conn.fetch(INSERT_STEPS, task_id, list(steps), texts, [len(text.encode()) for text in texts])


@dataclass(frozen=True, slots=True)
class WaitRecord:
    result: Any  # the pool's jsonb codec has decoded it (app/database.py)
    own: bool  # False: the name holds a step, or a wait of the other sort (`key` absent)
    now: datetime  # the database's


async def record_wait(conn: Any, *, task_id: UUID, name: str, key: str, seconds: float | None) -> WaitRecord:
    """The wait's step (created now if it is new), and the database's now()."""
    row = await conn.fetchrow(RECORD_WAIT, task_id, name, key, seconds)
    return WaitRecord(row["result"], bool(row["own"]), row["now"])


async def signal_stored(conn: Any, *, task_id: UUID, name: str) -> bool:
    return await conn.fetchrow(SIGNAL_STORED, task_id, name) is not None


async def suspend(
    conn: Any,
    *,
    task_id: UUID,
    attempt: int,
    worker_id: UUID,
    status: str,
    waiting_for: dict[str, Any] | None,
    run_at: datetime | None,
    new_children: int,
) -> Mapping[str, Any] | None:
    rows = await conn.fetch(
        SUSPEND,
        task_id,
        attempt,
        worker_id,
        status,
        None if waiting_for is None else json_text.dumps(waiting_for),
        run_at,
        new_children,
    )
    return rows[0] if rows else None


# --- composed inserts: children and dependents ---------------------------------------------------

# Like INSERT_TASKS (app/src/database/tasks.py), with what composition adds: the parent and its
# key (a child exists once per (parent, key): index tasks_parent_key), the dependencies, and a
# status decided by the caller for dependents (waiting, or cancelled when a dependency already
# failed). Plain enqueues never use this statement.
INSERT_COMPOSED = f"""
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[],
                         $7::smallint[], $8::int[], $9::timestamptz[], $10::float8[],
                         $11::uuid[], $12::text[], $13::text[], $14::text[], $15::jsonb[], $16::int[],
                         $17::text[], $18::text[], $19::text[])
        AS i(id, client_id, queue_id, queue, kind, payload, priority, max_attempts, run_at, delay_s,
             parent_id, child_key, depends_on, status, waiting_for, deps_open, last_error, concurrency_key,
             traceparent)
),
inserted AS (
    INSERT INTO tasks (id, client_id, queue_id, queue, kind, payload, status, priority, max_attempts, run_at,
                       parent_id, child_key, depends_on, waiting_for, deps_open, last_error, finished_at,
                       concurrency_key, traceparent)
    SELECT i.id, i.client_id, i.queue_id, i.queue, i.kind, i.payload,
           COALESCE(i.status, CASE WHEN due.at <= now() THEN 'available' ELSE 'scheduled' END),
           i.priority, i.max_attempts, due.at, i.parent_id, i.child_key, i.depends_on::uuid[],
           i.waiting_for, i.deps_open, i.last_error,
           CASE WHEN i.status = 'cancelled' THEN now() END, i.concurrency_key, i.traceparent
    FROM input i
    CROSS JOIN LATERAL (
        SELECT COALESCE(i.run_at, now() + make_interval(secs => COALESCE(i.delay_s, 0)), now()) AS at
    ) due
    ON CONFLICT (parent_id, child_key) WHERE parent_id IS NOT NULL DO NOTHING
    RETURNING {TASK_COLUMNS}
),
linked AS (
    INSERT INTO task_dependencies (task_id, depends_on_id)
    SELECT inserted.id, d FROM inserted CROSS JOIN LATERAL unnest(inserted.depends_on) AS d
    ON CONFLICT DO NOTHING
),
{notify_queues("woken", "SELECT queue_id FROM inserted WHERE status = 'available'")}
SELECT inserted.*, (SELECT n FROM woken) AS _woken FROM inserted
"""


@dataclass(frozen=True, slots=True)
class Composed:
    """What composition adds to a NewTask."""

    parent_id: UUID | None = None
    child_key: str | None = None
    depends_on: list[UUID] | None = None
    status: str | None = None  # None: available or scheduled by run_at, as for any task
    waiting_for: dict[str, Any] | None = None
    deps_open: int = 0
    last_error: str | None = None


async def insert_composed(conn: Executor, tasks: Sequence[tuple[NewTask, Composed]]) -> list[Task]:
    """Insert children or dependents; a child whose (parent, key) exists already is skipped."""
    rows = await conn.fetch(
        INSERT_COMPOSED,
        [t.id for t, _ in tasks],
        [t.client_id for t, _ in tasks],
        [t.queue_id for t, _ in tasks],
        [t.queue for t, _ in tasks],
        [t.kind for t, _ in tasks],
        [json_text.dumps(t.payload) for t, _ in tasks],
        [t.priority for t, _ in tasks],
        [t.max_attempts for t, _ in tasks],
        [t.run_at for t, _ in tasks],
        [t.delay_s for t, _ in tasks],
        [c.parent_id for _, c in tasks],
        [c.child_key for _, c in tasks],
        [None if c.depends_on is None else "{" + ",".join(map(str, c.depends_on)) + "}" for _, c in tasks],
        [c.status for _, c in tasks],
        [None if c.waiting_for is None else json_text.dumps(c.waiting_for) for _, c in tasks],
        [c.deps_open for _, c in tasks],
        [c.last_error for _, c in tasks],
        [t.concurrency_key for t, _ in tasks],
        [t.traceparent for t, _ in tasks],
    )
    return [to_task(row) for row in rows]


# Dependencies must exist, belong to the same client, and are marked so the trigger fires when
# they end; the UPDATE also locks them until the dependent is stored, so none can finish unseen.
MARK_DEPENDENCIES = """
UPDATE tasks SET has_dependents = true
WHERE id = ANY($1::uuid[]) AND client_id = $2
RETURNING id, status
"""


async def mark_dependencies(conn: Executor, *, client_id: UUID, ids: Sequence[UUID]) -> dict[UUID, str]:
    rows = await conn.fetch(MARK_DEPENDENCIES, sorted(set(ids)), client_id)
    return {row["id"]: row["status"] for row in rows}


# --- signals -------------------------------------------------------------------------------------

# A signal is kept (the first of a name wins) whether or not the task waits for it yet; a task
# waiting for exactly this signal becomes available in the same statement. A wait the sweep timed
# out is over: every run of the handler sees SignalTimeout there (the wait's record says so), so a
# signal of that name would never be delivered, or only to a later run that then took another path
# than the first: it is refused. The task's row is locked by LOCK_SIGNAL_TARGET first, in the same
# transaction, so that this statement's snapshot sees a sweep that held the lock until then.
# A signal is also refused when it would take the task's state past MAX_STATE_BYTES, or when the
# task keeps MAX_PENDING_SIGNALS signals no wait has received yet (`full` says which).
# `repeated` says the task already keeps a signal of this name with the same data (jsonb equality):
# the same request sent again, its first answer lost; it is answered as the first was.
LOCK_SIGNAL_TARGET = "SELECT id FROM tasks WHERE id = $1 AND client_id = $2 FOR UPDATE"
SEND_SIGNAL = f"""
WITH target AS (
    SELECT id, status, waiting_for, queue_id, state_bytes,
           EXISTS (SELECT 1 FROM task_steps s
                   WHERE s.task_id = tasks.id AND s.name = $3 AND s.wait
                     AND s.result @> '{{"timed_out": true}}'::jsonb) AS timed_out,
           EXISTS (SELECT 1 FROM task_signals g WHERE g.task_id = tasks.id AND g.name = $3) AS known,
           EXISTS (SELECT 1 FROM task_signals g
                   WHERE g.task_id = tasks.id AND g.name = $3 AND g.data = $4::jsonb) AS repeated,
           (SELECT count(*) FROM task_signals g
            WHERE g.task_id = tasks.id
              AND NOT EXISTS (SELECT 1 FROM task_steps w
                              WHERE w.task_id = g.task_id AND w.name = g.name AND w.wait)) AS pending
    FROM tasks WHERE id = $1 AND client_id = $2 FOR UPDATE
),
refusal AS (
    SELECT CASE WHEN known THEN NULL
                WHEN state_bytes + $5 > {MAX_STATE_BYTES} THEN 'bytes'
                WHEN pending >= {MAX_PENDING_SIGNALS} THEN 'pending' END AS why
    FROM target
),
stored AS (
    INSERT INTO task_signals (task_id, name, data)
    SELECT id, $3, $4::jsonb FROM target
    WHERE status NOT IN ('completed', 'discarded', 'cancelled') AND NOT timed_out
      AND (SELECT why FROM refusal) IS NULL
    ON CONFLICT (task_id, name) DO NOTHING
    RETURNING task_id
),
woken AS (
    UPDATE tasks t
    SET status = CASE WHEN t.status = 'waiting' AND t.waiting_for->>'type' = 'signal'
                           AND t.waiting_for->>'name' = $3 THEN 'available' ELSE t.status END,
        run_at = CASE WHEN t.status = 'waiting' AND t.waiting_for->>'type' = 'signal'
                           AND t.waiting_for->>'name' = $3 THEN now() ELSE t.run_at END,
        waiting_for = CASE WHEN t.status = 'waiting' AND t.waiting_for->>'type' = 'signal'
                           AND t.waiting_for->>'name' = $3 THEN NULL ELSE t.waiting_for END,
        durable = true,
        state_bytes = t.state_bytes + $5
    WHERE t.id IN (SELECT task_id FROM stored)
    RETURNING t.id, t.status, t.queue_id
),
notified AS (
    SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text))
         + count(pg_notify('{AVAILABLE_CHANNEL}', queue_id::text)) FILTER (WHERE status = 'available') AS n
    FROM woken
)
SELECT (SELECT status FROM target) AS task_status, (SELECT count(*) FROM stored) AS stored,
       (SELECT status FROM woken) AS status, (SELECT timed_out FROM target) AS timed_out,
       (SELECT why FROM refusal) AS refused, (SELECT state_bytes FROM target) AS state_bytes,
       (SELECT repeated FROM target) AS repeated,
       (SELECT n FROM notified) AS _n
"""


@dataclass(frozen=True, slots=True)
class SignalSent:
    task_status: str | None  # None: no such task of this client
    stored: bool  # False: the task is finished, its wait timed out, or a signal of this name was sent before
    status: str | None  # the task's status after the signal (when stored)
    timed_out: bool = False  # the task's wait for this signal timed out
    full: str | None = None  # not kept: "bytes" (MAX_STATE_BYTES) or "pending" (MAX_PENDING_SIGNALS)
    state_bytes: int = 0  # what the task's state held before this signal
    size: int = 0  # this signal's bytes
    repeated: bool = False  # the task keeps a signal of this name with this very data (a resend)


async def send_signal(conn: Any, *, client_id: UUID, task_id: UUID, name: str, data: Any) -> SignalSent:
    text = json_text.dumps(data)
    size = len(text.encode())
    async with conn.transaction():
        await conn.fetch(LOCK_SIGNAL_TARGET, task_id, client_id)
        row = (await conn.fetch(SEND_SIGNAL, task_id, client_id, name, text, size))[0]
    return SignalSent(
        row["task_status"],
        bool(row["stored"]),
        row["status"],
        bool(row["timed_out"]),
        row["refused"],
        int(row["state_bytes"] or 0),
        size,
        bool(row["repeated"]),
    )


# --- sweeping ------------------------------------------------------------------------------------

# The scheduler's safety net (index: tasks_composed_waiting): waits for a signal past their
# deadline resume (the wait's step is marked timed out, so the handler sees SignalTimeout and so
# does every replay), and waits whose children or dependencies are all done — which the trigger
# decides as they finish — resume if anything was missed.
SWEEP_WAITING = f"""
WITH due AS (
    SELECT id, waiting_for FROM tasks
    WHERE status = 'waiting' AND waiting_for IS NOT NULL
      AND CASE waiting_for->>'type'
              WHEN 'signal' THEN (waiting_for->>'timeout_at')::timestamptz <= now()
              WHEN 'children' THEN children_open <= 0
              WHEN 'dependencies' THEN deps_open <= 0
              ELSE false END
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
woken AS (
    UPDATE tasks t SET status = 'available', run_at = now(), waiting_for = NULL
    FROM due
    WHERE t.id = due.id AND t.status = 'waiting'
    RETURNING t.id, t.queue_id, due.waiting_for AS was
),
timed_out AS (
    UPDATE task_steps s SET result = s.result || '{{"timed_out": true}}'::jsonb
    FROM woken w
    WHERE w.was->>'type' = 'signal' AND s.task_id = w.id AND s.name = w.was->>'name' AND s.wait
),
notified AS (
    SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text))
         + count(pg_notify('{AVAILABLE_CHANNEL}', queue_id::text))
           AS n
    FROM woken
)
SELECT count(*) AS woken, (SELECT n FROM notified) AS _n FROM woken
"""


# Children that the end of their parent had to skip (they were locked at that moment), recorded by
# the trigger taskgate_composition_changed (migration 0014) in task_orphans: cancelled now, or
# asked to stop if running. A parent stops its children when it ends cancelled or discarded, or
# completed after a cancel was asked. A child that became unfinished again since (retried by hand)
# left the table then: it runs. Rows whose child is finished, or was handled here, go; a child
# still locked keeps its row for the next sweep.
SWEEP_ORPHANS = f"""
WITH picked AS (
    SELECT task_id FROM task_orphans LIMIT $1 FOR UPDATE SKIP LOCKED
),
orphans AS (
    SELECT c.id, p.status AS parent_status
    FROM picked JOIN tasks c ON c.id = picked.task_id JOIN tasks p ON p.id = c.parent_id
    WHERE c.status IN ('scheduled', 'available', 'running', 'waiting', 'retryable')
      AND NOT (c.status = 'running' AND c.cancel_requested)
    FOR UPDATE OF c SKIP LOCKED
),
changed AS (
    UPDATE tasks t
    SET {CANCELLING},
        last_error = COALESCE(
            t.last_error,
            'parent ' || t.parent_id || ' was '
            || CASE WHEN o.parent_status = 'discarded' THEN 'discarded' ELSE 'cancelled' END)
    FROM orphans o
    WHERE t.id = o.id
    RETURNING t.id, t.status
),
settled AS (
    DELETE FROM task_orphans x USING picked
    WHERE x.task_id = picked.task_id
      AND (x.task_id IN (SELECT id FROM changed)
           OR NOT EXISTS (SELECT 1 FROM tasks c WHERE c.id = x.task_id
                          AND c.status IN ('scheduled', 'available', 'running', 'waiting', 'retryable')
                          AND NOT (c.status = 'running' AND c.cancel_requested)))
    RETURNING x.task_id
)
SELECT count(*) AS changed,
       (SELECT count(*) FROM settled) AS _settled,
       (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) FROM changed)
     + (SELECT count(pg_notify('{CANCEL_CHANNEL}', id::text)) FROM changed WHERE status = 'running') AS _n
FROM changed
"""


async def sweep_waiting(conn: Executor, *, limit: int = 1000) -> int:
    """Composed waits resumed (timeouts, anything missed) and orphaned children cancelled."""
    rows = await conn.fetch(SWEEP_WAITING, limit)
    orphans = await conn.fetch(SWEEP_ORPHANS, limit)
    return int(rows[0]["woken"]) + int(orphans[0]["changed"])


# --- reading for the events stream ---------------------------------------------------------------

HISTORY_SINCE = """
SELECT 'step' AS event, name AS name, NULL::uuid AS child_id, NULL::text AS status, created_at AS at
FROM task_steps WHERE task_id = $1 AND created_at > $2
UNION ALL
SELECT 'signal', name, NULL, NULL, created_at FROM task_signals WHERE task_id = $1 AND created_at > $2
UNION ALL
SELECT 'child', child_key, id, status, finished_at FROM tasks
WHERE parent_id = $1 AND finished_at > $2 AND status IN ('completed', 'discarded', 'cancelled')
UNION ALL
SELECT 'suspended', attempt::text, NULL, NULL, finished_at FROM task_attempts
WHERE task_id = $1 AND outcome = 'suspended' AND finished_at > $2
ORDER BY at
"""


async def history_since(conn: Executor, *, task_id: UUID, since: datetime) -> list[Mapping[str, Any]]:
    return list(await conn.fetch(HISTORY_SINCE, task_id, since))


async def list_children(conn: Executor, *, parent_id: UUID, limit: int = 200) -> list[Mapping[str, Any]]:
    """A parent's children by key (index: tasks_parent_key), the first `limit` of them."""
    return list(
        await conn.fetch(
            "SELECT id, child_key, kind, status, finished_at FROM tasks WHERE parent_id = $1 "
            "ORDER BY child_key LIMIT $2",
            parent_id,
            limit,
        )
    )
