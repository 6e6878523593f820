"""A claim counter on each queue: limited queues are claimed in one statement, without a lock.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Bumped by every claim from a queue with a concurrency or rate limit, guarded by the value
    # the claim read: of two claims that counted the same running tasks, only one is written
    # (app/src/database/tasks.py, CLAIM_LIMITED). A constant default: no table rewrite.
    op.execute("ALTER TABLE queues ADD COLUMN claim_seq bigint NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE queues DROP COLUMN claim_seq")
