"""Count the state durable tasks stored before 0016 (their step results and signal data).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# As the writers count it: the JSON text of each step result (not a wait's record) and each
# signal's data. PostgreSQL's text adds a space after each ':' and ',', so this counts a little
# more than the compact JSON that was sent: a task near the bound may be refused a step sooner.
BATCH = """
WITH batch AS (
    SELECT id FROM tasks
    WHERE durable AND id > CAST(:id AS uuid)
    ORDER BY id
    LIMIT 1000
),
counted AS (
    UPDATE tasks t
    SET state_bytes =
        COALESCE((SELECT sum(octet_length(s.result::text)) FROM task_steps s
                  WHERE s.task_id = t.id AND NOT s.wait), 0)
      + COALESCE((SELECT sum(octet_length(g.data::text)) FROM task_signals g WHERE g.task_id = t.id), 0)
    FROM batch
    WHERE t.id = batch.id
)
SELECT id::text FROM batch ORDER BY id DESC LIMIT 1
"""


def upgrade() -> None:
    # In batches of 1,000 durable tasks by primary key (docs/operations.md, zero-downtime
    # migrations), each committed on its own: row locks only on the tasks one statement counts.
    # (In the migration's transaction, every counted task stayed locked until the last batch: the
    # release still serving could not claim, complete or signal any of them meanwhile.) Run again
    # after a failure, it counts every task afresh.
    with op.get_context().autocommit_block():
        connection = op.get_bind()
        last = "00000000-0000-0000-0000-000000000000"
        while True:
            row = connection.execute(sa.text(BATCH), {"id": last}).first()
            if row is None:
                return
            last = row[0]


def downgrade() -> None:
    pass  # 0016's downgrade drops the column
