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
    # claim of every task loaded with it. A constant default: no table rewrite.
    op.execute("ALTER TABLE task_steps ADD COLUMN wait boolean NOT NULL DEFAULT false")
    # the wait records stored so far: exactly the shapes RECORD_WAIT and the sweep write
    op.execute(
        r"""
        WITH shape AS (SELECT '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}$' AS time)
        UPDATE task_steps SET wait = true
        FROM shape
        WHERE CASE WHEN jsonb_typeof(result) = 'object' THEN  -- a step's result may be any JSON
                  (result - 'timed_out') = '{"wait_until": null}'::jsonb
                  OR ((SELECT count(*) FROM jsonb_object_keys(result - 'timed_out')) = 1
                      AND (result->>'sleep_until' ~ shape.time OR result->>'wait_until' ~ shape.time))
              ELSE false END
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE task_steps DROP COLUMN wait")
