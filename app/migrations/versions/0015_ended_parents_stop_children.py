"""A parent that ends discarded, or completed after a cancel was asked, stops its unfinished children;
the children it had to skip are recorded, so a child retried by hand later is left to run.

The trigger cancelled a parent's children only when the parent itself became `cancelled`. A cancel
asked while the parent ran ends it `cancelled` only if its attempt ends unfinished; an attempt that
failed for good (`discarded`) or returned (`completed`) left every child running for a parent that
would never gather them. Same for a parent that failed for good on its own. The trigger now stops
the unfinished children of a parent that ends cancelled or discarded, or completed with a cancel
asked (children a parent completes without gathering, fire and forget, are left alone).

The scheduler's sweep found the children the trigger skipped (locked at that moment) by looking
for cancelled parents with open children, so it also cancelled, within a second, a child retried
by hand after its parent's cancel. The trigger now records the children it skipped in
task_orphans, the sweep cancels those, and a child that becomes unfinished again (a retry) leaves
that table.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TERMINAL = "('completed', 'discarded', 'cancelled')"
UNFINISHED = "('scheduled', 'available', 'running', 'waiting', 'retryable')"


def trigger_function(*, parent_ended: str, why: str, unorphan: str = "", record_skipped: str = "") -> str:
    """0008's function with the parent's rule as given (upgrade and downgrade differ only there)."""
    return f"""
CREATE OR REPLACE FUNCTION taskgate_composition_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    woken record;
BEGIN
    IF NEW.parent_id IS NOT NULL THEN
        IF NEW.status IN {TERMINAL} AND OLD.status NOT IN {TERMINAL} THEN
            UPDATE tasks p
            SET children_open = p.children_open - 1,
                status = CASE WHEN p.children_open <= 1 AND p.status = 'waiting'
                                   AND p.waiting_for->>'type' = 'children' THEN 'available' ELSE p.status END,
                run_at = CASE WHEN p.children_open <= 1 AND p.status = 'waiting'
                                   AND p.waiting_for->>'type' = 'children' THEN now() ELSE p.run_at END,
                waiting_for = CASE WHEN p.children_open <= 1 AND p.status = 'waiting'
                                   AND p.waiting_for->>'type' = 'children' THEN NULL ELSE p.waiting_for END
            WHERE p.id = NEW.parent_id
            RETURNING p.status, p.queue_id, p.waiting_for INTO woken;
            PERFORM pg_notify('taskgate_events', NEW.parent_id::text);
            IF woken.status = 'available' AND woken.waiting_for IS NULL THEN
                PERFORM pg_notify('taskgate_available', woken.queue_id::text);
            END IF;
        ELSIF OLD.status IN {TERMINAL} AND NEW.status NOT IN {TERMINAL} THEN
            UPDATE tasks SET children_open = children_open + 1 WHERE id = NEW.parent_id;
            {unorphan}
        END IF;
    END IF;

    IF NEW.has_dependents AND NEW.status IN {TERMINAL} AND OLD.status NOT IN {TERMINAL} THEN
        IF NEW.status = 'completed' THEN
            FOR woken IN
                UPDATE tasks d
                SET deps_open = d.deps_open - 1,
                    status = CASE WHEN d.deps_open <= 1 THEN 'available' ELSE d.status END,
                    run_at = CASE WHEN d.deps_open <= 1 THEN now() ELSE d.run_at END,
                    waiting_for = CASE WHEN d.deps_open <= 1 THEN NULL ELSE d.waiting_for END
                FROM task_dependencies x
                WHERE x.depends_on_id = NEW.id AND d.id = x.task_id
                  AND d.status = 'waiting' AND d.waiting_for->>'type' = 'dependencies'
                RETURNING d.id, d.status, d.queue_id
            LOOP
                PERFORM pg_notify('taskgate_events', woken.id::text);
                IF woken.status = 'available' THEN
                    PERFORM pg_notify('taskgate_available', woken.queue_id::text);
                END IF;
            END LOOP;
        ELSE
            FOR woken IN
                UPDATE tasks d
                SET status = 'cancelled', finished_at = now(), waiting_for = NULL, cancel_requested = true,
                    last_error = 'dependency ' || NEW.id || ' was ' || NEW.status
                FROM task_dependencies x
                WHERE x.depends_on_id = NEW.id AND d.id = x.task_id
                  AND d.status = 'waiting' AND d.waiting_for->>'type' = 'dependencies'
                RETURNING d.id
            LOOP
                PERFORM pg_notify('taskgate_events', woken.id::text);
            END LOOP;
        END IF;
    END IF;

    IF {parent_ended} AND NEW.children_open > 0 THEN
        FOR woken IN
            UPDATE tasks c
            SET status = CASE WHEN c.status = 'running' THEN c.status ELSE 'cancelled' END,
                finished_at = CASE WHEN c.status = 'running' THEN c.finished_at ELSE now() END,
                waiting_for = CASE WHEN c.status = 'running' THEN c.waiting_for END,
                cancel_requested = true,
                last_error = COALESCE(c.last_error, 'parent ' || NEW.id || {why})
            FROM (SELECT id FROM tasks WHERE parent_id = NEW.id AND status IN {UNFINISHED}
                  FOR UPDATE SKIP LOCKED) l
            WHERE c.id = l.id AND c.status IN {UNFINISHED}
            RETURNING c.id, c.status
        LOOP
            PERFORM pg_notify('taskgate_events', woken.id::text);
            IF woken.status = 'running' THEN
                PERFORM pg_notify('taskgate_cancel', woken.id::text);
            END IF;
        END LOOP;
        {record_skipped}
    END IF;
    RETURN NULL;
END
$$
"""  # noqa: S608 (composed from module constants only)


# The same rule as app/src/database/durable.py's sweep relies on: kept apart, since a migration
# must read the same whatever the code says later.
ENDED = (
    f"OLD.status NOT IN {TERMINAL} AND (NEW.status IN ('cancelled', 'discarded') "
    "OR (NEW.status = 'completed' AND NEW.cancel_requested))"
)
WHY = "' was ' || CASE WHEN NEW.status = 'discarded' THEN 'discarded' ELSE 'cancelled' END"
BEFORE = "NEW.status = 'cancelled' AND OLD.status <> 'cancelled'"
# The children left unfinished and not asked to stop are the ones skipped (in this transaction
# the others read as cancelled, or running with cancel_requested).
RECORD_SKIPPED = f"""INSERT INTO task_orphans (task_id)
        SELECT id FROM tasks WHERE parent_id = NEW.id AND status IN {UNFINISHED}
          AND NOT (status = 'running' AND cancel_requested)
        ON CONFLICT DO NOTHING;"""  # noqa: S608 (composed from module constants only)
UNORPHAN = "DELETE FROM task_orphans WHERE task_id = NEW.id;"


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '3s'")
    # No foreign key: its check would lock the child's row, which is exactly what the trigger must
    # not wait for (a completion holds it). The sweep removes rows whose task is finished or gone.
    op.execute("CREATE TABLE task_orphans (task_id uuid PRIMARY KEY)")
    # the children the old sweep would have cancelled, found through its index before it goes
    op.execute(
        f"""
        INSERT INTO task_orphans (task_id)
        SELECT c.id FROM tasks p JOIN tasks c ON c.parent_id = p.id
        WHERE p.status = 'cancelled' AND p.children_open > 0 AND c.status IN {UNFINISHED}
          AND NOT (c.status = 'running' AND c.cancel_requested)
        """  # noqa: S608 (composed from module constants only)
    )
    op.execute(
        trigger_function(parent_ended=ENDED, why=WHY, unorphan=UNORPHAN, record_skipped=RECORD_SKIPPED)
    )
    op.execute("DROP INDEX tasks_cancelled_parents")


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '3s'")
    op.execute(trigger_function(parent_ended=BEFORE, why="' was cancelled'"))
    op.execute("DROP TABLE task_orphans")
    # 0008's index, built again (a plain build: writes to tasks wait while it scans the table)
    op.execute(
        "CREATE INDEX tasks_cancelled_parents ON tasks (id) WHERE status = 'cancelled' AND children_open > 0"
    )
