"""Flow control reads: why a task that is not running waits (`blocked_by`), and the hosts view.

`BLOCKED_BY` evaluates, for one task, the very SQL fragments the claims apply
(app/src/database/tasks.py: QUEUE_ROOM, QUEUE_TOKENS, KEY_ROOM, KEY_RATE_ROOM), over the same
rows, so the reason it reports is the rule that holds the task; a test checks each one against
the claim itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from app.src.database.tasks import KEY_RATE_ROOM, KEY_ROOM, QUEUE_ROOM, QUEUE_TOKENS, Executor

# A worker counts as live when it was seen this recently: in-process workers record themselves
# at start and every heartbeat round (a third of the lease), remote ones every few seconds.
LIVE_WORKER_S = 60.0

_KEY_RATE_ROOM = KEY_RATE_ROOM.format(queue="t.queue_id", key="t.concurrency_key", at="clock_timestamp()")
BLOCKED_BY = f"""
WITH t AS (
    SELECT id, client_id, queue_id, kind, status, run_at, concurrency_key
    FROM tasks WHERE id = $1 AND client_id = $2
),
q AS (SELECT q.* FROM queues q JOIN t ON q.id = t.queue_id),
remote AS (
    SELECT EXISTS (SELECT 1 FROM remote_kinds r, t WHERE r.client_id = t.client_id AND r.name = t.kind) AS yes
)
SELECT
    t.run_at > now() AS run_at_future,
    q.paused AS queue_paused,
    q.max_concurrency,
    COALESCE({QUEUE_ROOM.format(queue="t.queue_id")} <= 0, false) AS queue_full,
    q.rate_limit_per_s,
    COALESCE(floor({QUEUE_TOKENS}) < 1, false) AS queue_rate_empty,
    q.key_concurrency,
    t.concurrency_key IS NOT NULL
        AND COALESCE({KEY_ROOM.format(queue="t.queue_id", key="t.concurrency_key")} <= 0, false) AS key_full,
    q.key_rate_limit_per_s,
    t.concurrency_key IS NOT NULL
        AND COALESCE({_KEY_RATE_ROOM} <= 0, false) AS key_rate_empty,
    EXISTS (
        SELECT 1 FROM workers w
        WHERE w.last_seen_at > now() - make_interval(secs => $3)
          AND (w.queues IS NULL OR q.name = ANY(w.queues))
          AND t.kind = ANY(w.kinds)
          AND CASE WHEN (SELECT yes FROM remote) THEN w.remote AND w.client_id = t.client_id
                   ELSE NOT w.remote END
    ) AS has_worker
FROM t, q
"""


@dataclass(frozen=True, slots=True)
class Holds:
    """Which of the claim's rules hold a task now (each a boolean, with the limit it names)."""

    run_at_future: bool
    queue_paused: bool
    max_concurrency: int | None
    queue_full: bool
    rate_limit_per_s: float | None
    queue_rate_empty: bool
    key_concurrency: int | None
    key_full: bool
    key_rate_limit_per_s: float | None
    key_rate_empty: bool
    has_worker: bool


async def holds(conn: Executor, *, client_id: UUID, task_id: UUID) -> Holds | None:
    rows = await conn.fetch(BLOCKED_BY, task_id, client_id, LIVE_WORKER_S)
    if not rows:
        return None
    return Holds(*(rows[0][name] for name in Holds.__dataclass_fields__))


# A destination's permits in flight and its adaptive state (http_host_permits, http_hosts: both
# a few rows per host). $1: the hosts to show (NULL: every host), $2: HTTP_HOST_MAX_CONCURRENCY,
# $3: HTTP_CIRCUIT_FAILURES, $4: the page starts after this host (NULL: from the first), $5: at
# most this many (NULL: all; the per-host columns are computed for the page's rows only).
HOSTS = """
WITH hosts AS (
    SELECT host FROM http_hosts
    WHERE ($1::text[] IS NULL OR host = ANY($1::text[])) AND ($4::text IS NULL OR host > $4::text)
    UNION
    SELECT DISTINCT host FROM http_host_permits
    WHERE ($1::text[] IS NULL OR host = ANY($1::text[])) AND ($4::text IS NULL OR host > $4::text)
)
SELECT hosts.host,
       COALESCE(h.concurrency_limit, $2::int) AS concurrency_limit,
       (SELECT count(*) FROM http_host_permits p
        WHERE p.host = hosts.host AND p.holder IS NOT NULL AND p.expires_at > now())::int AS in_flight,
       CASE WHEN COALESCE(h.consecutive_failures, 0) < $3 THEN 'closed'
            WHEN h.opened_until > now() THEN 'open' ELSE 'half_open' END AS circuit,
       COALESCE(h.consecutive_failures, 0) AS consecutive_failures,
       -- the error-rate window is the current minute; an older one counts as nothing
       CASE WHEN h.window_started_at > now() - interval '60 s' THEN h.window_requests ELSE 0 END
           AS recent_requests,
       CASE WHEN h.window_started_at > now() - interval '60 s' AND h.window_requests > 0
            THEN round(h.window_failures::numeric / h.window_requests, 4)::float8 ELSE 0 END AS error_rate
FROM hosts LEFT JOIN http_hosts h ON h.host = hosts.host
ORDER BY hosts.host
LIMIT $5
"""


@dataclass(frozen=True, slots=True)
class HostRow:
    host: str
    concurrency_limit: int
    in_flight: int
    circuit: str
    consecutive_failures: int
    recent_requests: int
    error_rate: float


def _host(row: Mapping[str, Any]) -> HostRow:
    return HostRow(*(row[name] for name in HostRow.__dataclass_fields__))


async def hosts(
    conn: Executor,
    *,
    only: list[str] | None,
    max_concurrency: int,
    circuit_failures: int,
    after: str | None = None,
    limit: int | None = None,
) -> list[HostRow]:
    rows = await conn.fetch(HOSTS, only, max_concurrency, circuit_failures, after, limit)
    return [_host(row) for row in rows]


async def client_hosts(conn: Executor, *, client_id: UUID, after: str | None, limit: int) -> list[str]:
    """The destinations this client's tasks called, in name order after `after` (http_host_clients,
    primary key (client_id, host))."""
    rows = await conn.fetch(
        "SELECT host FROM http_host_clients WHERE client_id = $1 AND ($2::text IS NULL OR host > $2::text) "
        "ORDER BY host LIMIT $3",
        client_id,
        after,
        limit,
    )
    return [row["host"] for row in rows]


async def record_client_host(conn: Executor, *, client_id: UUID, host: str) -> None:
    await conn.fetch(
        "INSERT INTO http_host_clients (host, client_id) VALUES ($1, $2) "
        "ON CONFLICT (client_id, host) DO UPDATE SET last_used_at = now()",
        host,
        client_id,
    )
