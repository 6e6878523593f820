"""Remote kinds (per client, JSON Schema contracts) and the workers seen (in-process and remote).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OLD_SCOPES = "'tasks:read','tasks:write','queues:admin','schedules:admin','clients:admin'"
NEW_SCOPES = OLD_SCOPES + ",'kinds:admin','tasks:work'"


def _check(scopes: str) -> str:
    return f"CHECK (scopes <@ ARRAY[{scopes}]::text[])"


def upgrade() -> None:
    op.execute("ALTER TABLE api_clients DROP CONSTRAINT api_clients_scopes_check")
    op.execute(f"ALTER TABLE api_clients ADD CONSTRAINT api_clients_scopes_check {_check(NEW_SCOPES)}")
    # A remote kind belongs to one client; `version` grows with every change of its schemas, so a
    # compiled validator is cached per (client, name, version). The primary key is also what the
    # in-process claim probes to leave remote tasks alone (app/src/database/tasks.py).
    op.execute(
        """
        CREATE TABLE remote_kinds (
            client_id      uuid        NOT NULL,
            name           text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
            payload_schema jsonb       NOT NULL,
            result_schema  jsonb,
            description    text,
            max_attempts   integer     CHECK (max_attempts BETWEEN 1 AND 1000),
            version        integer     NOT NULL DEFAULT 1,
            created_at     timestamptz NOT NULL DEFAULT now(),
            updated_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (client_id, name)
        )
        """
    )
    # The remote claim reads one (queue, kind) at a time, in claim order: a worker serving kind A
    # never walks past a backlog of kind B in the same queue.
    op.execute(
        "CREATE INDEX tasks_claim_kind ON tasks (queue_id, kind, priority, run_at, id) "
        "WHERE status = 'available'"
    )
    # Workers seen: remote ones (client_id set) upsert on claim, heartbeat and completion;
    # in-process ones (client_id NULL: they serve every client) from their lease keeper.
    op.execute(
        """
        CREATE TABLE workers (
            id           uuid        PRIMARY KEY,
            client_id    uuid,
            name         text        NOT NULL,
            version      text,
            remote       boolean     NOT NULL,
            kinds        text[]      NOT NULL DEFAULT '{}',
            queues       text[],
            running      integer     NOT NULL DEFAULT 0,
            started_at   timestamptz NOT NULL DEFAULT now(),
            last_seen_at timestamptz NOT NULL DEFAULT now()
        ) WITH (fillfactor = 70)
        """
    )
    op.execute("CREATE INDEX workers_seen ON workers (last_seen_at)")


def downgrade() -> None:
    op.execute("DROP TABLE workers")
    op.execute("DROP INDEX tasks_claim_kind")
    op.execute("DROP TABLE remote_kinds")
    op.execute(
        "UPDATE api_clients SET scopes = array(SELECT s FROM unnest(scopes) s "
        "WHERE s NOT IN ('kinds:admin', 'tasks:work'))"
    )
    op.execute("ALTER TABLE api_clients DROP CONSTRAINT api_clients_scopes_check")
    op.execute(f"ALTER TABLE api_clients ADD CONSTRAINT api_clients_scopes_check {_check(OLD_SCOPES)}")
