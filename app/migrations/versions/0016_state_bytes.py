"""A durable task counts the bytes of its stored state, so that state can be bounded.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The JSON bytes of a task's stored step results and signal data (app/src/database/durable.py,
    # MAX_STATE_BYTES), kept by the statements that store them: checking the bound must not read
    # the whole state at every step. A constant default: no table rewrite; 0017 counts what is
    # stored already, after this lock is released.
    op.execute("SET LOCAL lock_timeout = '3s'")
    op.execute("ALTER TABLE tasks ADD COLUMN state_bytes bigint NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN state_bytes")
