"""Durable composition: steps, signals, child tasks and dependencies.

Additive: new nullable or defaulted columns on tasks (metadata-only in PostgreSQL 11+), three
small tables keyed by task, and one row trigger that fires only for tasks that take part in a
composition (a child, a task others depend on, a parent with open children).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TERMINAL = "('completed', 'discarded', 'cancelled')"
UNFINISHED = "('scheduled', 'available', 'running', 'waiting', 'retryable')"

# What a status change of a composed task means for the others, in the transaction that made it
# (every path that finishes a task — worker completions, remote completions, the lease rescuer,
# the http poller, cancel — goes through an UPDATE of tasks.status, so none can forget this):
# - a child that finishes counts its parent's open children down; the last one makes a parent
#   that waits for its children `available`;
# - a task that completes counts its dependents' open dependencies down (the last one makes them
#   `available`); one that is discarded or cancelled cancels its waiting dependents;
# - a cancelled parent cancels its unfinished children (running ones are asked to stop). Children
#   locked by someone else at that moment (a completion, which locks the child and then the
#   parent: waiting for it here could deadlock) are skipped; the scheduler's sweep gets them.
TRIGGER_FUNCTION = f"""
CREATE FUNCTION taskgate_composition_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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

    IF NEW.status = 'cancelled' AND OLD.status <> 'cancelled' AND NEW.children_open > 0 THEN
        FOR woken IN
            UPDATE tasks c
            SET status = CASE WHEN c.status = 'running' THEN c.status ELSE 'cancelled' END,
                finished_at = CASE WHEN c.status = 'running' THEN c.finished_at ELSE now() END,
                waiting_for = CASE WHEN c.status = 'running' THEN c.waiting_for END,
                cancel_requested = true,
                last_error = COALESCE(c.last_error, 'parent ' || NEW.id || ' was cancelled')
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
    END IF;
    RETURN NULL;
END
$$
"""  # noqa: S608 (composed from module constants only)


def upgrade() -> None:
    # durable: the task has stored steps, signals or children, so a claim loads them (a task that
    # uses none is claimed exactly as before: no extra statement, no join).
    # waiting_for: why a `waiting` task waits ({type: signal|children|dependencies, ...}); NULL for
    # the http kind's provider polling (shown as {type: http_status}).
    # children_open / deps_open: counters the trigger counts down; has_dependents marks a task
    # that others depend on, so the trigger fires for it.
    op.execute(
        """
        ALTER TABLE tasks
            ADD COLUMN durable        boolean NOT NULL DEFAULT false,
            ADD COLUMN waiting_for    jsonb,
            ADD COLUMN parent_id      uuid,
            ADD COLUMN child_key      text,
            ADD COLUMN depends_on     uuid[],
            ADD COLUMN children_open  integer NOT NULL DEFAULT 0,
            ADD COLUMN deps_open      integer NOT NULL DEFAULT 0,
            ADD COLUMN has_dependents boolean NOT NULL DEFAULT false
        """
    )
    # A child is created once per (parent, key), however often the parent re-runs.
    op.execute(
        "CREATE UNIQUE INDEX tasks_parent_key ON tasks (parent_id, child_key) WHERE parent_id IS NOT NULL"
    )
    # The scheduler's sweep of composed waits (signal timeouts, anything missed).
    op.execute(
        "CREATE INDEX tasks_composed_waiting ON tasks (id) "
        "WHERE status = 'waiting' AND waiting_for IS NOT NULL"
    )
    # The sweep's view of cancelled parents that still have unfinished children (normally none).
    op.execute(
        "CREATE INDEX tasks_cancelled_parents ON tasks (id) WHERE status = 'cancelled' AND children_open > 0"
    )
    op.execute(
        """
        CREATE TABLE task_steps (
            task_id    uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            name       text        NOT NULL,
            result     jsonb,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (task_id, name)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE task_signals (
            task_id    uuid        NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            name       text        NOT NULL,
            data       jsonb,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (task_id, name)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE task_dependencies (
            task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            depends_on_id uuid NOT NULL,
            PRIMARY KEY (task_id, depends_on_id)
        )
        """
    )
    op.execute("CREATE INDEX task_dependencies_on ON task_dependencies (depends_on_id)")
    op.execute(TRIGGER_FUNCTION)
    # WHEN is evaluated as the row is written: a task outside any composition queues no event.
    op.execute(
        """
        CREATE TRIGGER tasks_composition AFTER UPDATE OF status ON tasks
        FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status
              AND (NEW.parent_id IS NOT NULL OR NEW.has_dependents OR NEW.children_open > 0))
        EXECUTE FUNCTION taskgate_composition_changed()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tasks_composition ON tasks")
    op.execute("DROP FUNCTION taskgate_composition_changed()")
    op.execute("DROP TABLE task_dependencies")
    op.execute("DROP TABLE task_signals")
    op.execute("DROP TABLE task_steps")
    op.execute("DROP INDEX tasks_cancelled_parents")
    op.execute("DROP INDEX tasks_composed_waiting")
    op.execute("DROP INDEX tasks_parent_key")
    op.execute(
        """
        ALTER TABLE tasks
            DROP COLUMN durable, DROP COLUMN waiting_for, DROP COLUMN parent_id, DROP COLUMN child_key,
            DROP COLUMN depends_on, DROP COLUMN children_open, DROP COLUMN deps_open,
            DROP COLUMN has_dependents
        """
    )
