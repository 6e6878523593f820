"""Flag the wait records stored before 0012: exactly the shapes RECORD_WAIT and the sweep write.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# One key (a time, or a signal wait's null), beside the sweep's "timed_out"; a step's result may be
# any JSON, so only objects are looked into.
BATCH = r"""
WITH shape AS (SELECT '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}$' AS time),
batch AS (
    SELECT task_id, name FROM task_steps
    WHERE NOT wait AND (task_id, name) > (CAST(:task_id AS uuid), CAST(:name AS text))
    ORDER BY task_id, name
    LIMIT 5000
),
flagged AS (
    UPDATE task_steps s SET wait = true
    FROM batch, shape
    WHERE s.task_id = batch.task_id AND s.name = batch.name
      AND CASE WHEN jsonb_typeof(s.result) = 'object' THEN
              (s.result - 'timed_out') = '{"wait_until": null}'::jsonb
              OR ((SELECT count(*) FROM jsonb_object_keys(s.result - 'timed_out')) = 1
                  AND (s.result->>'sleep_until' ~ shape.time OR s.result->>'wait_until' ~ shape.time))
          ELSE false END
)
SELECT task_id::text, name FROM batch ORDER BY task_id DESC, name DESC LIMIT 1
"""


def upgrade() -> None:
    # In batches of 5,000 steps by primary key (docs/operations.md, zero-downtime migrations), each
    # committed on its own: no lock on the table beyond the updates' own, and row locks only on
    # the wait records one statement flags, not on every one until the last batch. Run again
    # after a failure, it finds only what is left to flag.
    with op.get_context().autocommit_block():
        connection = op.get_bind()
        last = ("00000000-0000-0000-0000-000000000000", "")
        while True:
            row = connection.execute(sa.text(BATCH), {"task_id": last[0], "name": last[1]}).first()
            if row is None:
                return
            last = (row[0], row[1])


def downgrade() -> None:
    pass  # 0012's downgrade drops the flag
