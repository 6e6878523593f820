"""A retry keeps the attempt count: attempt numbers are never reused, so they fence completions.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # each statement takes the table's lock briefly; waiting behind a long transaction would stop
    # every claim meanwhile, so give up instead (docs/operations.md, zero-downtime migrations)
    op.execute("SET LOCAL lock_timeout = '3s'")
    # The attempts a task had used when it was last retried by hand: its budget of attempts per
    # life is max_attempts minus this, and a retry moves max_attempts on by that budget
    # (app/src/database/tasks.py, RETRYING). A constant default: no table rewrite.
    op.execute("ALTER TABLE tasks ADD COLUMN attempts_before_retry integer NOT NULL DEFAULT 0")
    # max_attempts grows with each retry, past the 1000 a request may ask for (the API still
    # bounds what is asked); NOT VALID: the stored rows satisfied the stricter check already
    op.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_max_attempts_check")
    op.execute(
        "ALTER TABLE tasks ADD CONSTRAINT tasks_max_attempts_check CHECK (max_attempts >= 1) NOT VALID"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP CONSTRAINT tasks_max_attempts_check")
    op.execute(
        "ALTER TABLE tasks ADD CONSTRAINT tasks_max_attempts_check "
        "CHECK (max_attempts BETWEEN 1 AND 1000) NOT VALID"
    )
    op.execute("ALTER TABLE tasks DROP COLUMN attempts_before_retry")
