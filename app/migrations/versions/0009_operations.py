"""Operations: the traceback of a failed Python attempt, and the trace context a task was enqueued in.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Additive only (nullable columns without defaults: a catalog change, no table rewrite), so the
previous release keeps running against this schema during a rolling upgrade.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # bounded to 8 KiB by the writer (app/src/api/engine/outcomes.py clip_traceback); the check keeps a
    # writer that forgets from storing megabytes per attempt
    op.execute(
        "ALTER TABLE task_attempts ADD COLUMN traceback text "
        "CHECK (traceback IS NULL OR length(traceback) <= 8192)"
    )
    # W3C traceparent of the request that enqueued the task (OpenTelemetry); at most 55 chars in
    # version 00, bounded generously for later versions
    op.execute(
        "ALTER TABLE tasks ADD COLUMN traceparent text "
        "CHECK (traceparent IS NULL OR length(traceparent) <= 256)"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN traceparent")
    op.execute("ALTER TABLE task_attempts DROP COLUMN traceback")
