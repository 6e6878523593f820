"""User schedules, their fire ledger, and leases on maintenance jobs.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE schedules (
            id             uuid        PRIMARY KEY,
            client_id      uuid        NOT NULL,
            name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
            cron           text        NOT NULL,
            timezone       text        NOT NULL,
            queue          text        NOT NULL CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
            kind           text        NOT NULL,
            payload        jsonb       NOT NULL,
            paused         boolean     NOT NULL DEFAULT false,
            -- the next fire time (UTC); NULL while paused. Advanced only by a guarded update.
            next_run_at    timestamptz,
            last_fire_time timestamptz,
            last_task_id   uuid,
            created_at     timestamptz NOT NULL DEFAULT now(),
            updated_at     timestamptz NOT NULL DEFAULT now(),
            UNIQUE (client_id, name)
        )
        """
    )
    # The firing job: due, unpaused schedules in fire order.
    op.execute("CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused")
    # Per-client listing with keyset pagination (ids are UUIDv7).
    op.execute("CREATE INDEX schedules_client ON schedules (client_id, id)")
    # One row per (schedule, fire time): the key that makes each fire create exactly one task,
    # whichever replica fires it. Written in the same transaction as the task.
    op.execute(
        """
        CREATE TABLE schedule_fires (
            schedule_id uuid        NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
            fire_time   timestamptz NOT NULL,
            task_id     uuid        NOT NULL,
            coalesced   integer     NOT NULL DEFAULT 0,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (schedule_id, fire_time)
        )
        """
    )
    # Pruning the ledger past retention.
    op.execute("CREATE INDEX schedule_fires_time ON schedule_fires (fire_time)")
    # Where a task came from when a schedule made it: {id, fire_time, coalesced_fires, manual}.
    op.execute("ALTER TABLE tasks ADD COLUMN schedule jsonb")
    # A lease on the running period: no second replica starts a job while a run is in flight,
    # and a run whose replica died frees the job when the lease expires.
    op.execute(
        """
        ALTER TABLE maintenance_jobs
            ADD COLUMN run_id           uuid,
            ADD COLUMN lease_expires_at timestamptz,
            ADD COLUMN failures         bigint NOT NULL DEFAULT 0,
            ADD COLUMN last_failed_at   timestamptz,
            ADD COLUMN last_error       text
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE maintenance_jobs
            DROP COLUMN last_error, DROP COLUMN last_failed_at, DROP COLUMN failures,
            DROP COLUMN lease_expires_at, DROP COLUMN run_id
        """
    )
    op.execute("ALTER TABLE tasks DROP COLUMN schedule")
    op.execute("DROP TABLE schedule_fires")
    op.execute("DROP TABLE schedules")
