"""The `http` kind: per-host permits (concurrency across processes) and host health (circuit).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (destination host, permit slot): a request in flight holds a slot until it
    # releases it or its lease expires, so a crashed worker cannot leak a permit. Rows are reused
    # (acquire and release are UPDATEs of non-indexed columns: HOT, hence the fillfactor).
    op.execute(
        """
        CREATE TABLE http_host_permits (
            host       text        NOT NULL,
            slot       integer     NOT NULL CHECK (slot > 0),
            holder     uuid,
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (host, slot)
        ) WITH (fillfactor = 70)
        """
    )
    op.execute(
        "ALTER TABLE http_host_permits SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_cost_limit = 10000, autovacuum_vacuum_cost_delay = 0)"
    )
    # Circuit breaker state per destination host. A row appears with a host's first failure; a
    # healthy host has none (or one with consecutive_failures = 0 until pruned).
    op.execute(
        """
        CREATE TABLE http_hosts (
            host                 text        PRIMARY KEY,
            consecutive_failures integer     NOT NULL DEFAULT 0,
            opened_until         timestamptz,
            probe_holder         uuid,
            probe_until          timestamptz,
            updated_at           timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE http_hosts")
    op.execute("DROP TABLE http_host_permits")
