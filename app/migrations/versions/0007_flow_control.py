"""Flow control by key: concurrency keys and per-key limits, debounce, adaptive host limits.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks
            ADD COLUMN concurrency_key text CHECK (char_length(concurrency_key) BETWEEN 1 AND 128),
            ADD COLUMN debounce_key    text CHECK (char_length(debounce_key) BETWEEN 1 AND 128),
            ADD COLUMN debounce_until  timestamptz
        """
    )
    # The keyed claim (app/src/database/flow.py) walks the distinct keys that have available
    # tasks (a loose index scan: one probe per key) and reads each key's head in claim order.
    # Keyless tasks are not in it (the predicate), so a queue without keys pays nothing for it.
    op.execute(
        "CREATE INDEX tasks_claim_key ON tasks (queue_id, concurrency_key, priority, run_at, id) "
        "WHERE status = 'available' AND concurrency_key IS NOT NULL"
    )
    # Running tasks per key (key_concurrency), counted under the queue lock: a handful of rows.
    op.execute(
        "CREATE INDEX tasks_running_key ON tasks (queue_id, concurrency_key) "
        "WHERE status = 'running' AND concurrency_key IS NOT NULL"
    )
    # Debounce: at most one task per (client, debounce key) that has not started; an enqueue with
    # the same key meets it through ON CONFLICT on this index (race-free, no advisory lock).
    op.execute(
        "CREATE UNIQUE INDEX tasks_debounce ON tasks (client_id, debounce_key) "
        "WHERE debounce_key IS NOT NULL AND status IN ('scheduled', 'available')"
    )
    op.execute(
        """
        ALTER TABLE queues
            ADD COLUMN key_concurrency      integer CHECK (key_concurrency > 0),
            ADD COLUMN key_rate_limit_per_s double precision CHECK (key_rate_limit_per_s > 0),
            -- round-robin position of the keyed claim: the last key it visited
            ADD COLUMN key_cursor           text
        """
    )
    # Per-key sliding-window log of claim times (key_rate_limit_per_s): only keys claimed within
    # the window matter; older rows are pruned by maintenance. Written under the queue lock.
    op.execute(
        """
        CREATE TABLE task_key_starts (
            queue_id   bigint        NOT NULL,
            key        text          NOT NULL,
            starts     timestamptz[] NOT NULL DEFAULT '{}',
            updated_at timestamptz   NOT NULL DEFAULT now(),
            PRIMARY KEY (queue_id, key)
        ) WITH (fillfactor = 70)
        """
    )
    op.execute("CREATE INDEX task_key_starts_updated ON task_key_starts (updated_at)")
    op.execute("ALTER TABLE schedules ADD COLUMN concurrency_key text")
    # Adaptive (AIMD) concurrency per destination host, cluster-wide, beside its circuit state:
    # NULL is HTTP_HOST_MAX_CONCURRENCY. Counters of the current minute give the error rate.
    op.execute(
        """
        ALTER TABLE http_hosts
            ADD COLUMN concurrency_limit integer CHECK (concurrency_limit > 0),
            ADD COLUMN successes         integer NOT NULL DEFAULT 0,
            ADD COLUMN decreased_at      timestamptz,
            ADD COLUMN window_started_at timestamptz NOT NULL DEFAULT now(),
            ADD COLUMN window_requests   integer NOT NULL DEFAULT 0,
            ADD COLUMN window_failures   integer NOT NULL DEFAULT 0
        """
    )
    # Which clients' tasks called a host (GET /api/hosts shows a client its own hosts only).
    op.execute(
        """
        CREATE TABLE http_host_clients (
            host         text        NOT NULL,
            client_id    uuid        NOT NULL,
            last_used_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (client_id, host)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE http_host_clients")
    op.execute(
        "ALTER TABLE http_hosts DROP COLUMN concurrency_limit, DROP COLUMN successes, "
        "DROP COLUMN decreased_at, DROP COLUMN window_started_at, DROP COLUMN window_requests, "
        "DROP COLUMN window_failures"
    )
    op.execute("ALTER TABLE schedules DROP COLUMN concurrency_key")
    op.execute("DROP TABLE task_key_starts")
    op.execute(
        "ALTER TABLE queues DROP COLUMN key_concurrency, DROP COLUMN key_rate_limit_per_s, "
        "DROP COLUMN key_cursor"
    )
    op.execute("DROP INDEX tasks_debounce")
    op.execute("DROP INDEX tasks_running_key")
    op.execute("DROP INDEX tasks_claim_key")
    op.execute(
        "ALTER TABLE tasks DROP COLUMN concurrency_key, DROP COLUMN debounce_key, DROP COLUMN debounce_until"
    )
