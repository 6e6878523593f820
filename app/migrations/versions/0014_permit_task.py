"""A host permit names the task whose request holds it: rescuing a lease frees only its permits.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The rescuer freed every permit of the rescued task's worker, those of its other requests
    # (with valid leases) too, and the host's limit could then be exceeded. A nullable column
    # without a default: no table rewrite. Permits taken before it have none and end with their
    # own lease (or their release), as before the rescuer freed any.
    op.execute("SET LOCAL lock_timeout = '3s'")
    op.execute("ALTER TABLE http_host_permits ADD COLUMN task_id uuid")


def downgrade() -> None:
    op.execute("ALTER TABLE http_host_permits DROP COLUMN task_id")
