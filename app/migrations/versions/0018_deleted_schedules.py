"""Deleted schedules, kept a while so that a delete sent again answers as the first one did.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The schedule as it was deleted (its row as JSON, read back with jsonb_populate_record), so a
    # DELETE sent again after its answer was lost (a 503 after the commit) answers it again, not
    # 404. Pruned after IDEMPOTENCY_RETENTION_HOURS, as idempotency keys are.
    op.execute(
        """
        CREATE TABLE deleted_schedules (
            id         uuid        PRIMARY KEY,
            client_id  uuid        NOT NULL,
            schedule   jsonb       NOT NULL,
            deleted_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Pruning past retention.
    op.execute("CREATE INDEX deleted_schedules_time ON deleted_schedules (deleted_at)")


def downgrade() -> None:
    op.execute("DROP TABLE deleted_schedules")
