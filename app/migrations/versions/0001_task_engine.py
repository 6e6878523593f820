"""Task engine: queues, tasks, attempts, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = "'scheduled','available','running','waiting','retryable','completed','discarded','cancelled'"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE queues (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id        uuid        NOT NULL,
            name             text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
            max_concurrency  integer     CHECK (max_concurrency > 0),
            rate_limit_per_s double precision CHECK (rate_limit_per_s > 0),
            max_attempts     integer     NOT NULL DEFAULT 25 CHECK (max_attempts BETWEEN 1 AND 1000),
            min_backoff_s    double precision NOT NULL DEFAULT 1 CHECK (min_backoff_s >= 0),
            max_backoff_s    double precision NOT NULL DEFAULT 3600 CHECK (max_backoff_s >= min_backoff_s),
            paused           boolean     NOT NULL DEFAULT false,
            -- token bucket shared by every worker process (rate_limit_per_s)
            rate_tokens      double precision NOT NULL DEFAULT 0,
            rate_updated_at  timestamptz NOT NULL DEFAULT now(),
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            UNIQUE (client_id, name)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE tasks (
            id               uuid        PRIMARY KEY,
            client_id        uuid        NOT NULL,
            queue_id         bigint      NOT NULL REFERENCES queues (id) ON DELETE CASCADE,
            queue            text        NOT NULL,
            kind             text        NOT NULL,
            payload          jsonb       NOT NULL,
            status           text        NOT NULL CHECK (status IN ({STATUSES})),
            priority         smallint    NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
            attempts         integer     NOT NULL DEFAULT 0,
            max_attempts     integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
            run_at           timestamptz NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            started_at       timestamptz,
            finished_at      timestamptz,
            lease_expires_at timestamptz,
            worker_id        uuid,
            cancel_requested boolean     NOT NULL DEFAULT false,
            result           jsonb,
            last_error       text,
            progress         jsonb
        ) WITH (fillfactor = 80)
        """
    )
    # The claim index: only claimable rows, so finished tasks never enter it and the claim cost
    # does not grow with history. Ordered as the claim reads it, per queue.
    op.execute(
        "CREATE INDEX tasks_claim ON tasks (queue_id, priority, run_at, id) WHERE status = 'available'"
    )
    # Staging: scheduled and retryable tasks whose time has come become available.
    op.execute("CREATE INDEX tasks_due ON tasks (run_at) WHERE status IN ('scheduled', 'retryable')")
    # Leased (running) tasks: the rescuer scans only these. Keyed on the lease, not on status, so
    # that no status guard elsewhere can be mistaken for this predicate (a planner that proved
    # "status = 'running'" used to scan every running row to find a few by id).
    op.execute("CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL")
    # Waiting tasks: the status poller of external providers.
    op.execute("CREATE INDEX tasks_waiting ON tasks (run_at) WHERE status = 'waiting'")
    # Per-client listing with keyset pagination (ids are time-ordered UUIDv7).
    op.execute("CREATE INDEX tasks_client ON tasks (client_id, id)")
    # Counts per queue and status: queue pages, per-queue concurrency, per-client quota.
    op.execute("CREATE INDEX tasks_queue_status ON tasks (queue_id, status)")
    # Pruning finished tasks past retention.
    op.execute(
        "CREATE INDEX tasks_finished ON tasks (finished_at) "
        "WHERE status IN ('completed', 'discarded', 'cancelled')"
    )
    # High churn: vacuum early and often (pgqueuer #389, River #59).
    op.execute(
        "ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_cost_limit = 10000, autovacuum_vacuum_cost_delay = 0, "
        "autovacuum_analyze_scale_factor = 0.02)"
    )
    op.execute(
        """
        CREATE TABLE task_attempts (
            id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            -- no foreign key: the check costs a trigger per attempt on the hot path; rows are
            -- written only by guarded completions and deleted with their task (prune, purge)
            task_id     uuid        NOT NULL,
            attempt     integer     NOT NULL,
            started_at  timestamptz NOT NULL,
            finished_at timestamptz NOT NULL,
            outcome     text        NOT NULL,
            http_status integer,
            error       text,
            duration_ms double precision NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX task_attempts_task ON task_attempts (task_id, id)")
    op.execute(
        "ALTER TABLE task_attempts SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_cost_limit = 10000, autovacuum_vacuum_cost_delay = 0)"
    )
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            client_id    uuid        NOT NULL,
            key          text        NOT NULL,
            request_hash text        NOT NULL,
            task_ids     uuid[]      NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (client_id, key)
        )
        """
    )
    op.execute("CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)")
    # One row per maintenance job: the conditional upsert on it elects one replica per period.
    op.execute(
        """
        CREATE TABLE maintenance_jobs (
            name              text        PRIMARY KEY,
            last_started_at   timestamptz NOT NULL,
            last_succeeded_at timestamptz,
            runs              bigint      NOT NULL DEFAULT 0,
            started_by        text
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE maintenance_jobs")
    op.execute("DROP TABLE idempotency_keys")
    op.execute("DROP TABLE task_attempts")
    op.execute("DROP TABLE tasks")
    op.execute("DROP TABLE queues")
