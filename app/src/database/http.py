"""Storage of the `http` kind: host permits, host health (circuit breaker), waiting-task polling.

Every statement is one guarded round trip, so the limits hold across all worker processes and a
process that dies mid-request leaks nothing: permits and probes are leases that expire, and a
poller's claim on a waiting task is a lease on its run_at.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import dacite

from app.src.database.tasks import EVENTS_CHANNEL, Executor
from app.src.utils import json_text

_DACITE = dacite.Config(check_types=False)


# --- host permits and circuit ----------------------------------------------------------------------

# Take one free permit slot of `host` (1..limit) for holder $2 (a process) and task $6 (whose
# request it is for: rescuing that task's lease frees it), unless the host's circuit is tripped
# and task $6 is not its probe. Index: the primary key (host, slot); the slot
# rows of one host are few.
# A slot is free when it has no row or its lease expired (a crashed holder); the upsert re-checks
# that on the latest row version, so two processes racing for one slot cannot both win (the loser
# gets no row and tries again). Random order keeps concurrent acquirers off the same slot.
ACQUIRE_PERMIT = """
WITH circuit AS (
    SELECT consecutive_failures, consecutive_failures >= $4 AS tripped,
           COALESCE(opened_until > now(), false) AS open,
           GREATEST(EXTRACT(epoch FROM opened_until - now()), 0)::float8 AS open_for_s,
           COALESCE(probe_holder = $6 AND probe_until > now(), false) AS probing
    FROM http_hosts WHERE host = $1
),
admitted AS (
    SELECT NOT COALESCE((SELECT tripped FROM circuit), false)
           OR COALESCE((SELECT probing FROM circuit), false) AS yes
),
lim AS (
    -- the host's adaptive limit (AIMD, NULL: the full HTTP_HOST_MAX_CONCURRENCY)
    SELECT LEAST($3::int, COALESCE((SELECT concurrency_limit FROM http_hosts WHERE host = $1), $3::int)) AS n
),
free AS (
    SELECT s.slot FROM generate_series(1, (SELECT n FROM lim)) AS s(slot)
    LEFT JOIN http_host_permits p ON p.host = $1 AND p.slot = s.slot
    WHERE (p.slot IS NULL OR p.expires_at <= now()) AND (SELECT yes FROM admitted)
    ORDER BY random()
    LIMIT 1
),
taken AS (
    INSERT INTO http_host_permits AS p (host, slot, holder, task_id, expires_at)
    SELECT $1, slot, $2, $6, now() + make_interval(secs => $5) FROM free
    ON CONFLICT (host, slot) DO UPDATE
    SET holder = EXCLUDED.holder, task_id = EXCLUDED.task_id, expires_at = EXCLUDED.expires_at
    WHERE p.expires_at <= now()
    RETURNING slot
)
SELECT (SELECT slot FROM taken) AS slot,
       COALESCE((SELECT consecutive_failures FROM circuit), 0) AS failures,
       COALESCE((SELECT tripped FROM circuit), false) AS tripped,
       COALESCE((SELECT open FROM circuit), false) AS open,
       COALESCE((SELECT open_for_s FROM circuit), 0)::float8 AS open_for_s,
       (SELECT n FROM lim) AS limit_now
"""


@dataclass(frozen=True, slots=True)
class Admission:
    slot: int | None  # the permit taken, or None
    failures: int  # the host's consecutive failures (> 0: a success must be written to heal it)
    tripped: bool  # the host's circuit is open or half-open
    open: bool  # ... and still cooling down (open_for_s more seconds)
    open_for_s: float
    limit_now: int  # the host's adaptive concurrency limit


async def acquire_permit(
    conn: Executor,
    *,
    host: str,
    process_id: UUID,
    task_id: UUID,
    limit: int,
    circuit_failures: int,
    lease_s: float,
) -> Admission:
    rows = await conn.fetch(ACQUIRE_PERMIT, host, process_id, limit, circuit_failures, lease_s, task_id)
    return dacite.from_dict(Admission, dict(rows[0]), config=_DACITE)


# Half-open: after the cool-down one request (the probe) may go; the guarded UPDATE elects it.
# A probe that dies is replaced when its lease ends.
CLAIM_PROBE = """
UPDATE http_hosts SET probe_holder = $2, probe_until = now() + make_interval(secs => $4)
WHERE host = $1 AND consecutive_failures >= $3
  AND (opened_until IS NULL OR opened_until <= now())
  AND (probe_until IS NULL OR probe_until <= now())
RETURNING host
"""


async def claim_probe(
    conn: Executor, *, host: str, task_id: UUID, circuit_failures: int, lease_s: float
) -> bool:
    """Elect task `task_id`'s request as the probe of a half-open host."""
    return bool(await conn.fetch(CLAIM_PROBE, host, task_id, circuit_failures, lease_s))


# Give the permit (held by process $3) back and record what task $7's request said about the
# host's health, in one round trip: a failure counts (and opens the circuit at the threshold, or
# re-opens it after a failed probe); a success closes it; a neutral end (nothing was sent) only
# frees a probe it held. The healthy path writes http_hosts only when there is something to heal.
# Slot 0 releases no permit, only the health it saw.
# The error-rate window of a host row: requests and failures of the current minute (only hosts
# with a row are counted: a host that never failed has none and an error rate of 0).
WINDOW = """window_requests = CASE WHEN h.window_started_at < now() - interval '60 s' THEN 1
                               ELSE h.window_requests + 1 END,
        window_failures = CASE WHEN h.window_started_at < now() - interval '60 s' THEN {failure}
                               ELSE h.window_failures + {failure} END,
        window_started_at = CASE WHEN h.window_started_at < now() - interval '60 s' THEN now()
                                 ELSE h.window_started_at END"""
DECREASE = "$8 AND (h.decreased_at IS NULL OR h.decreased_at < now() - interval '1 s')"
RELEASE_PERMIT = f"""
WITH released AS (
    UPDATE http_host_permits SET holder = NULL, task_id = NULL, expires_at = now()
    WHERE host = $1 AND slot = $2 AND holder = $3
    RETURNING slot
),
failed AS (
    INSERT INTO http_hosts AS h (host, consecutive_failures, opened_until, updated_at, concurrency_limit,
                                 decreased_at, window_requests, window_failures)
    SELECT $1, 1, CASE WHEN $5 <= 1 THEN now() + make_interval(secs => $6) END, now(),
           CASE WHEN $8 THEN NULLIF(GREATEST(1, $9::int / 2), $9::int) END, CASE WHEN $8 THEN now() END, 1, 1
    WHERE $4 = 'failure'
    ON CONFLICT (host) DO UPDATE
    SET consecutive_failures = h.consecutive_failures + 1,
        opened_until = CASE WHEN h.consecutive_failures + 1 >= $5
                            THEN now() + make_interval(secs => $6) ELSE h.opened_until END,
        probe_holder = NULL, probe_until = NULL, updated_at = now(),
        -- multiplicative decrease, at most once per second (the answers of one burst count once)
        concurrency_limit = CASE WHEN {DECREASE}
                                 THEN GREATEST(1, COALESCE(h.concurrency_limit, $9::int) / 2)
                                 ELSE h.concurrency_limit END,
        decreased_at = CASE WHEN {DECREASE} THEN now() ELSE h.decreased_at END,
        successes = CASE WHEN $8 THEN 0 ELSE h.successes END,
        {WINDOW.format(failure=1)}
    RETURNING consecutive_failures
),
healed AS (
    -- a success heals the circuit and, below the full limit, counts towards the additive
    -- increase: one more permit after each window of `limit` successes in a row
    UPDATE http_hosts h
    SET consecutive_failures = 0, opened_until = NULL, probe_holder = NULL, probe_until = NULL,
        updated_at = now(),
        successes = CASE WHEN h.concurrency_limit IS NULL OR h.successes + 1 >= h.concurrency_limit THEN 0
                         ELSE h.successes + 1 END,
        concurrency_limit = CASE WHEN h.concurrency_limit IS NULL THEN NULL
                                 WHEN h.successes + 1 >= h.concurrency_limit
                                 THEN NULLIF(LEAST(h.concurrency_limit + 1, $9::int), $9::int)
                                 ELSE h.concurrency_limit END,
        {WINDOW.format(failure=0)}
    WHERE host = $1 AND $4 = 'success'
    RETURNING 0 AS consecutive_failures
),
unprobed AS (
    UPDATE http_hosts SET probe_holder = NULL, probe_until = NULL
    WHERE host = $1 AND $4 = 'neutral' AND probe_holder = $7
    RETURNING host
)
SELECT (SELECT consecutive_failures FROM failed) AS failures,
       EXISTS (SELECT 1 FROM healed) AS healed,
       (SELECT count(*) FROM released) + (SELECT count(*) FROM unprobed) AS _n
"""


@dataclass(frozen=True, slots=True)
class Released:
    failures: int | None  # consecutive failures after a failure, else None
    healed: bool  # a success closed a circuit or cleared a failure count


async def release_permit(
    conn: Executor,
    *,
    host: str,
    slot: int,
    process_id: UUID,
    task_id: UUID,
    health: str,
    circuit_failures: int,
    cooldown_s: float,
    throttled: bool = False,
    max_concurrency: int = 1,
) -> Released:
    """`throttled` (429, 503, a timeout): the host asks for less; its limit halves (AIMD)."""
    rows = await conn.fetch(
        RELEASE_PERMIT,
        host,
        slot,
        process_id,
        health,
        circuit_failures,
        cooldown_s,
        task_id,
        throttled,
        max_concurrency,
    )
    return Released(failures=rows[0]["failures"], healed=rows[0]["healed"])


@dataclass(frozen=True, slots=True)
class HostHealth:
    host: str
    consecutive_failures: int
    tripped: bool


# Hosts that failed recently (a small table: a host gets a row at its first failure; zeroed rows
# are pruned after an idle hour), whole: the gauge shows 0 for a healed host, not nothing.
async def host_health(conn: Executor, *, circuit_failures: int) -> list[HostHealth]:
    rows = await conn.fetch(
        "SELECT host, consecutive_failures, consecutive_failures >= $1 AS tripped FROM http_hosts",
        circuit_failures,
    )
    return [dacite.from_dict(HostHealth, dict(row), config=_DACITE) for row in rows]


# Permit rows of hosts not called for a while and zeroed health rows: both tables stay as small as
# the set of recently used hosts (a scan: they hold hosts x limit rows at most).
async def prune_hosts(conn: Executor, *, idle_s: float) -> None:
    await conn.fetch(
        "DELETE FROM http_host_permits WHERE expires_at < now() - make_interval(secs => $1)", idle_s
    )
    await conn.fetch(
        "DELETE FROM http_hosts WHERE consecutive_failures = 0 "
        "AND updated_at < now() - make_interval(secs => $1)",
        idle_s,
    )


# --- waiting tasks -------------------------------------------------------------------------------

# Claim due waiting tasks of the given kinds for one poll (index: tasks_waiting (run_at) WHERE
# status = 'waiting'). SKIP LOCKED keeps concurrent pollers apart for the statement; moving run_at
# past the poll's longest duration (two requests of timeout_s, plus a margin) keeps them apart for
# the poll itself, and the new run_at is the claim's token: the poll's outcome is written only if
# run_at still equals it (a poller that outlived its lease writes nothing). A poller that dies
# leaves the task due again when the lease ends: nothing is lost on a restart.
CLAIM_WAITING = """
WITH due AS (
    SELECT id FROM tasks
    WHERE status = 'waiting' AND run_at <= now() AND kind = ANY($1::text[])
      AND waiting_for IS NULL  -- a provider's answer; not a dependency, a signal or children
    ORDER BY run_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET run_at = now() + make_interval(secs => $3 + 2 * LEAST(900,
        CASE WHEN jsonb_typeof(t.payload -> 'timeout_s') = 'number'
             THEN (t.payload ->> 'timeout_s')::float8 ELSE 30 END))
FROM due
WHERE t.id = due.id AND t.status = 'waiting'
RETURNING t.id, t.client_id, t.queue_id, t.queue, t.kind, t.payload, t.result AS state, t.attempts,
          t.max_attempts, t.run_at AS lease, t.attempts_before_retry AS retry_base
"""


@dataclass(frozen=True, slots=True)
class WaitingTask:
    id: UUID
    client_id: UUID
    queue_id: int
    queue: str
    kind: str
    payload: dict[str, Any]
    state: Any
    attempts: int
    max_attempts: int
    lease: datetime
    retry_base: int = 0  # attempts_before_retry: attempts that were no failure (outcomes.after_failure)


async def claim_waiting(
    conn: Executor, *, kinds: list[str], limit: int, margin_s: float
) -> list[WaitingTask]:
    rows = await conn.fetch(CLAIM_WAITING, kinds, limit, margin_s)
    return [dacite.from_dict(WaitingTask, dict(row), config=_DACITE) for row in rows]


# Still waiting: poll again later, with the updated provider state. Not a status change; guarded
# by the claim's lease (status and run_at unchanged since the claim).
RESCHEDULE_WAITING = """
UPDATE tasks
SET run_at = now() + make_interval(secs => $3), result = $4::jsonb, last_error = COALESCE($5, last_error)
WHERE id = $1 AND status = 'waiting' AND run_at = $2
RETURNING id
"""


async def reschedule_waiting(
    conn: Executor,
    *,
    task_id: UUID,
    lease: datetime,
    delay_s: float,
    state: Mapping[str, Any],
    error: str | None,
) -> bool:
    return bool(await conn.fetch(RESCHEDULE_WAITING, task_id, lease, delay_s, json_text.dumps(state), error))


# The waiting is over: the status the poller decided (via the state machine; $10 are the sources
# it allows from `waiting`), the attempt record of the asynchronous phase, and the events NOTIFY.
# Guarded by status and the claim's lease, so a task cancelled meanwhile stays cancelled.
FINISH_WAITING = f"""
WITH done AS (
    UPDATE tasks t
    SET status = $3,
        result = CASE WHEN $3 = 'completed' THEN $4::jsonb ELSE t.result END,
        last_error = COALESCE($5, t.last_error),
        run_at = CASE WHEN $6::float8 IS NOT NULL THEN now() + make_interval(secs => $6::float8)
                      ELSE t.run_at END,
        finished_at = CASE WHEN $3 IN ('completed', 'discarded', 'cancelled') THEN now() END
    WHERE t.id = $1 AND t.status = ANY($10::text[]) AND t.run_at = $2
    RETURNING t.id, t.attempts, t.queue, t.kind, t.status
),
recorded AS (
    INSERT INTO task_attempts
        (task_id, attempt, started_at, finished_at, outcome, http_status, error, duration_ms)
    SELECT id, attempts, $9, now(), $8, $7, $5, EXTRACT(epoch FROM now() - $9::timestamptz) * 1000
    FROM done
),
notified AS (SELECT count(pg_notify('{EVENTS_CHANNEL}', id::text)) AS n FROM done)
SELECT done.*, (SELECT n FROM notified) AS _notified FROM done
"""


async def finish_waiting(
    conn: Executor,
    *,
    task_id: UUID,
    lease: datetime,
    status: str,
    guard: list[str],
    result: Any,
    error: str | None,
    retry_in_s: float | None,
    http_status: int | None,
    outcome: str,
    started_at: datetime,
) -> bool:
    rows = await conn.fetch(
        FINISH_WAITING,
        task_id,
        lease,
        status,
        None if result is None else json_text.dumps(result),
        error,
        retry_in_s,
        http_status,
        outcome,
        started_at,
        guard,
    )
    return bool(rows)
