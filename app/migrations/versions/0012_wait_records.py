"""Wait records are told apart from steps by a flag, not by the keys of their JSON.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A sleep's end and a signal wait's deadline are stored in task_steps beside the handler's
    # steps (app/src/database/durable.py, RECORD_WAIT). Told apart by their keys, a step whose
    # result held "sleep_until" was read as a sleep, and a value that was not a time failed the
    # claim of every task loaded with it. A constant default: no table rewrite; the stored wait
    # records are flagged by 0013, after this lock is released.
    op.execute("SET LOCAL lock_timeout = '3s'")
    op.execute("ALTER TABLE task_steps ADD COLUMN wait boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE task_steps DROP COLUMN wait")
