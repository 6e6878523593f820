"""The schedules service: create, read, change, delete, trigger, and fire due schedules.

Firing is exactly once per fire time, whichever replica does it (see app/src/database/schedules.py
for the storage guarantees). Fire times come from the database clock. A fire no later than the
misfire grace after its time makes its own task, so a busy or briefly stalled scheduler leaves no
gaps; fires missed by more than the grace (every scheduler replica was down) are coalesced into
one task that says how many fire times it stands for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import structlog

from app.database import Database
from app.src.api import cron as crontab
from app.src.api.engine import submit
from app.src.api.engine.submit import Submitter, TaskRequest
from app.src.api.engine.task_engine import TaskEngine
from app.src.api.errors import Conflict, NotFound, TooManyQueues, TooManyRequests, Unprocessable
from app.src.api.models.schedules import Schedule, ScheduleIn, SchedulePatch, TaskTemplate
from app.src.api.models.tasks import Task
from app.src.api.tasks import decode_cursor, encode_cursor
from app.src.database import schedules as schedule_store
from app.src.database import tasks as task_store
from app.src.database.schedules import Advance, FireRecord, NameTaken
from app.src.database.tasks import Executor, NewTask
from app.src.utils.ids import uuid7
from app.src.utils.metrics import SCHEDULE_FIRES

log = structlog.get_logger("taskgate.schedules")

FIRE_BATCH = 100  # due schedules per firing transaction
MAX_FIRES_PER_SCHEDULE = 1000  # on-time fires one schedule makes per transaction; the rest next tick
MAX_COALESCED_COUNT = 1000  # missed fire times counted one by one before skipping ahead


# --- validation ----------------------------------------------------------------------------------


async def _checked(
    engine: TaskEngine,
    *,
    client_id: UUID,
    cron: str,
    timezone: str,
    task: TaskTemplate | None,
    allow_seconds: bool,
) -> crontab.Cron:
    """The parsed cron, or one 422 naming every failing field (cron, timezone, task)."""
    errors: list[dict[str, Any]] = []
    parsed = None
    try:
        crontab.check_iana(timezone)
        parsed = crontab.parse(cron, timezone, allow_seconds=allow_seconds)
    except crontab.CronError as exc:
        errors.append({"field": f"body.{exc.field}", "message": str(exc), "type": exc.field})
    if task is not None:
        try:
            await submit.checked_template(
                engine, client_id=client_id, kind_name=task.kind, payload=task.payload, at=("body", "task")
            )
        except Unprocessable as exc:
            errors.extend(exc.errors or [])
    if errors or parsed is None:
        raise Unprocessable("The schedule is not valid.", errors=errors)
    return parsed


async def _ensure_queue(conn: Executor, engine: TaskEngine, *, client_id: UUID, task: TaskTemplate) -> None:
    """The queue the schedule's fires go to, created in the schedule's transaction within the
    client's cap on queues (else the same 409 as an enqueue, naming `body.task.queue`): a schedule
    accepted into a queue past the cap would have its every fire refused."""
    request = TaskRequest(kind=task.kind, payload=task.payload, queue=task.queue)
    await submit.ensure_queues_within(
        conn, engine.rules, client_id=client_id, requests=[request], field_prefix=_body_template_fields
    )


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A schedule named {name!r} already exists for this client.")


# --- client operations ---------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _same_definition(schedule: Schedule, data: ScheduleIn) -> bool:
    """Whether a stored schedule is what `data` asks for (its name, cron, time zone, template and
    paused flag): the same creation sent again."""
    return (
        schedule.name == data.name
        and schedule.cron == data.cron.strip()
        and schedule.timezone == data.timezone
        and schedule.paused == data.paused
        and schedule.queue == data.task.queue
        and schedule.kind == data.task.kind
        and _canonical(schedule.payload) == _canonical(data.task.payload)
        and schedule.concurrency_key == data.task.concurrency_key
    )


async def create(
    engine: TaskEngine, *, client_id: UUID, data: ScheduleIn, allow_seconds: bool
) -> tuple[Schedule, bool]:
    """The new schedule, and whether it was made now. A schedule of that name that is already
    exactly this one (the same request sent again after its answer was lost, or a 503 after its
    commit) is answered as it is (False); one of that name that differs is a 409."""
    parsed = await _checked(
        engine,
        client_id=client_id,
        cron=data.cron,
        timezone=data.timezone,
        task=data.task,
        allow_seconds=allow_seconds,
    )
    try:
        async with engine.db.driver() as conn, conn.transaction():
            await _ensure_queue(conn, engine, client_id=client_id, task=data.task)
            next_run_at = None if data.paused else parsed.next_after(await schedule_store.now(conn))
            created = await schedule_store.insert(
                conn,
                schedule_id=uuid7(),
                client_id=client_id,
                name=data.name,
                cron=data.cron.strip(),
                timezone=data.timezone,
                queue=data.task.queue,
                kind=data.task.kind,
                payload=data.task.payload,
                paused=data.paused,
                next_run_at=next_run_at,
                concurrency_key=data.task.concurrency_key,
            )
    except NameTaken:
        async with engine.db.driver() as conn:
            existing = await schedule_store.named(conn, client_id=client_id, name=data.name)
        if existing is not None and _same_definition(existing, data):
            return existing, False
        raise _name_taken(data.name) from None
    return created, True


async def get(db: Database, *, client_id: UUID, schedule_id: UUID) -> Schedule:
    async with db.driver() as conn:
        schedule = await schedule_store.get(conn, client_id=client_id, schedule_id=schedule_id)
    if schedule is None:
        raise NotFound(f"No schedule {schedule_id}.")
    return schedule


async def list_schedules(
    db: Database, *, client_id: UUID, limit: int, cursor: str | None
) -> tuple[list[Schedule], str | None]:
    before = decode_cursor(cursor) if cursor else None
    async with db.driver() as conn:
        items = await schedule_store.list_for_client(
            conn, client_id=client_id, before=before, limit=limit + 1
        )
    next_cursor = encode_cursor(items[limit - 1].id) if len(items) > limit else None
    return items[:limit], next_cursor


async def update(
    engine: TaskEngine, *, client_id: UUID, schedule_id: UUID, data: SchedulePatch, allow_seconds: bool
) -> Schedule:
    """Change a schedule under its row lock, so a concurrent fire sees the old or the new one."""
    given = data.model_fields_set
    nulls = sorted(name for name in given if getattr(data, name) is None)
    if nulls:
        raise Unprocessable(
            "These fields cannot be null.",
            errors=[{"field": f"body.{name}", "message": "cannot be null", "type": "value_error"}
                    for name in nulls],
        )  # fmt: skip
    async with engine.db.driver() as conn, conn.transaction():
        current = await schedule_store.get(conn, client_id=client_id, schedule_id=schedule_id, lock=True)
        if current is None:
            raise NotFound(f"No schedule {schedule_id}.")
        timing = bool(given & {"cron", "timezone"})
        cron = data.cron.strip() if data.cron is not None else current.cron
        timezone = data.timezone if data.timezone is not None else current.timezone
        paused = data.paused if data.paused is not None else current.paused
        resumed = current.paused and not paused
        # an unchanged expression is read as it was accepted (seconds included where allowed then)
        parsed = await _checked(
            engine,
            client_id=client_id,
            cron=cron,
            timezone=timezone,
            task=data.task,
            allow_seconds=allow_seconds or "cron" not in given,
        )
        changes: dict[str, Any] = {"name": data.name, "cron": cron, "timezone": timezone, "paused": paused}
        changes = {key: value for key, value in changes.items() if key in given}
        if data.task is not None:
            await _ensure_queue(conn, engine, client_id=client_id, task=data.task)
            changes.update(
                queue=data.task.queue,
                kind=data.task.kind,
                payload=data.task.payload,
                concurrency_key=data.task.concurrency_key,
            )
        if paused:
            changes["next_run_at"] = None
        elif timing or resumed or current.next_run_at is None:
            changes["next_run_at"] = parsed.next_after(await schedule_store.now(conn))
        try:
            schedule = await schedule_store.update(
                conn, client_id=client_id, schedule_id=schedule_id, changes=changes
            )
        except NameTaken:
            raise _name_taken(data.name or "") from None
    if schedule is None:  # not while this transaction holds the row lock
        raise NotFound(f"No schedule {schedule_id}.")
    return schedule


async def delete(db: Database, *, client_id: UUID, schedule_id: UUID) -> Schedule:
    """Delete a schedule and return it as it was; the tasks it already made are kept.

    A schedule already deleted (within IDEMPOTENCY_RETENTION_HOURS) is answered as it was, as the
    delete that deleted it was: the same request sent again after its answer was lost (a 503 after
    the commit) succeeds, where a 404 said "no such schedule" of one it had deleted."""
    async with db.driver() as conn:
        schedule = await schedule_store.delete(conn, client_id=client_id, schedule_id=schedule_id)
        if schedule is None:
            schedule = await schedule_store.deleted(conn, client_id=client_id, schedule_id=schedule_id)
    if schedule is None:
        raise NotFound(f"No schedule {schedule_id}.")
    return schedule


async def trigger(engine: TaskEngine, submitter: Submitter, *, schedule_id: UUID) -> Task:
    """Enqueue the schedule's task now (also while paused); its cron fires are unaffected."""
    schedule = await get(engine.db, client_id=submitter.client_id, schedule_id=schedule_id)
    async with engine.db.driver() as conn:
        fired_at = await schedule_store.now(conn)
    request = TaskRequest(
        kind=schedule.kind,
        payload=schedule.payload,
        queue=schedule.queue,
        schedule=_ref(schedule.id, fired_at, coalesced=0, manual=True),
        concurrency_key=schedule.concurrency_key,
    )
    new = await submit.prepare(engine, submitter, [request], field_prefix=_template_fields)
    async with engine.db.driver() as conn:
        tasks = await submit.store_prepared(conn, new)
    submit.accepted(engine, tasks)
    SCHEDULE_FIRES.labels("manual").inc()
    return tasks[0]


def _template_fields(index: int) -> tuple[str | int, ...]:
    return ("task",)


def _body_template_fields(index: int) -> tuple[str | int, ...]:
    return ("body", "task")


def _ref(schedule_id: UUID, fire_time: datetime, *, coalesced: int, manual: bool = False) -> dict[str, Any]:
    return {
        "id": str(schedule_id),
        "fire_time": fire_time.isoformat(),
        "coalesced_fires": coalesced,
        "manual": manual,
    }


# --- firing --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fire:
    time: datetime
    coalesced: int  # later missed fire times this fire stands for
    on_time: bool  # within the grace: the task is due at its fire time


@dataclass(frozen=True, slots=True)
class FirePlan:
    fires: list[Fire]
    next_run_at: datetime | None


def plan_fires(cron: crontab.Cron, *, due_at: datetime, now: datetime, grace_s: float) -> FirePlan:
    """The fires one due schedule makes now, and its next fire time.

    Fire times older than the grace are missed: the first of them fires once for all of them
    (its fire time is the key, `coalesced` counts the others). Each later fire time up to now
    fires on its own.
    """
    fires: list[Fire] = []
    horizon = now - timedelta(seconds=grace_s)
    moment: datetime | None = due_at
    if due_at < horizon:
        missed = 0
        moment = cron.next_after(due_at)
        while moment is not None and moment < horizon and missed < MAX_COALESCED_COUNT:
            missed += 1
            moment = cron.next_after(moment)
        if moment is not None and moment < horizon:  # too many to count: skip to the grace window
            moment = cron.next_at_or_after(horizon)
        fires.append(Fire(due_at, missed, on_time=False))
    while moment is not None and moment <= now and len(fires) < MAX_FIRES_PER_SCHEDULE:
        fires.append(Fire(moment, 0, on_time=True))
        moment = cron.next_after(moment)
    return FirePlan(fires, moment)


@dataclass
class FireReport:
    schedules: int = 0  # due schedules handled
    on_time: int = 0  # tasks for fire times within the grace
    missed: int = 0  # tasks for fire times beyond the grace, each standing for later missed ones too
    coalesced_fires: int = 0  # missed fire times folded into those tasks
    duplicates: int = 0  # fire times already in the ledger: no second task
    over_quota: int = 0  # fire times that made no task: the client held its quota of unfinished tasks
    stopped: list[str] = field(default_factory=list)  # schedules that could not be computed

    def merge(self, other: FireReport) -> None:
        self.schedules += other.schedules
        self.on_time += other.on_time
        self.missed += other.missed
        self.coalesced_fires += other.coalesced_fires
        self.duplicates += other.duplicates
        self.over_quota += other.over_quota
        self.stopped += other.stopped

    def summary(self) -> dict[str, Any] | None:
        values: dict[str, Any] = {
            "schedules": self.schedules,
            "on_time": self.on_time,
            "missed": self.missed,
            "coalesced_fires": self.coalesced_fires,
            "duplicates": self.duplicates,
            "over_quota": self.over_quota,
        }
        if self.stopped:
            values["stopped"] = self.stopped
        return values if any(values.values()) else None


async def fire_due(engine: TaskEngine, *, grace_s: float, batch: int = FIRE_BATCH) -> FireReport:
    """Fire due schedules (up to `batch`) in one transaction: ledger rows, tasks, next fire times.

    Each fire is a task request like any other (engine/submit.py): its client's quota applies, so
    a fire that would exceed it makes no task (counted as `over_quota`, the schedule moves on).
    """
    report = FireReport()
    async with engine.db.driver() as conn, conn.transaction():
        now, due = await schedule_store.lock_due(conn, limit=batch)
        if now is None:
            return report
        report.schedules = len(due)
        own_limits = await task_store.client_quotas(conn, list({s.client_id for s in due}))
        planned: dict[UUID, int] = {}  # tasks planned per client in this transaction so far
        advances: list[Advance] = []
        records: list[tuple[FireRecord, NewTask, bool]] = []  # (ledger row, its task, on time)
        for schedule in due:
            due_at = schedule.next_run_at or now  # due rows always have one
            plan = _plan(schedule, due_at=due_at, now=now, grace_s=grace_s)
            if plan is None:
                report.stopped.append(str(schedule.id))
                advances.append(Advance(schedule.id, due_at, None, None, None, pause=True))
                continue
            advances.append(Advance(schedule.id, due_at, plan.next_run_at, None, None))
            requests = [
                TaskRequest(
                    kind=schedule.kind,
                    payload=schedule.payload,
                    queue=schedule.queue,
                    concurrency_key=schedule.concurrency_key,
                    run_at=fire.time if fire.on_time else None,
                    schedule=_ref(schedule.id, fire.time, coalesced=fire.coalesced),
                )
                for fire in plan.fires
            ]
            submitter = Submitter(schedule.client_id, own_limits.get(schedule.client_id))
            try:
                new = await submit.prepare(
                    engine,
                    submitter,
                    requests,
                    check_contract=False,
                    pending=planned.get(schedule.client_id, 0),
                )
            except (TooManyRequests, TooManyQueues, Unprocessable) as refused:
                report.over_quota += len(requests) if isinstance(refused, TooManyRequests) else 0
                log.warning("schedule fire refused", schedule_id=str(schedule.id), reason=refused.detail)
                continue
            planned[schedule.client_id] = planned.get(schedule.client_id, 0) + len(new)
            for fire, task in zip(plan.fires, new, strict=True):
                records.append(
                    (FireRecord(schedule.id, fire.time, task.id, fire.coalesced), task, fire.on_time)
                )
        fresh = await schedule_store.insert_fires(conn, [r for r, _, _ in records]) if records else set()
        made = [(r, t, on_time) for r, t, on_time in records if t.id in fresh]
        tasks = await submit.store_prepared(conn, [t for _, t, _ in made]) if made else []
        latest = {r.schedule_id: r for r, _, _ in made}  # fires are planned in time order
        advances = [
            Advance(
                a.schedule_id,
                a.expected,
                a.next_run_at,
                latest[a.schedule_id].fire_time if a.schedule_id in latest else None,
                latest[a.schedule_id].task_id if a.schedule_id in latest else None,
                pause=a.pause,
            )
            for a in advances
        ]
        if len(await schedule_store.advance(conn, advances)) != len(advances):
            # cannot happen while this transaction holds the rows; if it did, fire nothing
            raise RuntimeError("a due schedule changed under its row lock")
    report.duplicates = len(records) - len(made)
    report.on_time = sum(1 for _, _, on_time in made if on_time)
    report.missed = len(made) - report.on_time
    report.coalesced_fires = sum(r.coalesced for r, _, _ in made)
    submit.accepted(engine, tasks)
    SCHEDULE_FIRES.labels("on_time").inc(report.on_time)
    SCHEDULE_FIRES.labels("missed").inc(report.missed)
    SCHEDULE_FIRES.labels("over_quota").inc(report.over_quota)
    return report


def _plan(schedule: Schedule, *, due_at: datetime, now: datetime, grace_s: float) -> FirePlan | None:
    """None when the stored expression can no longer be computed (the schedule is then paused)."""
    try:
        # stored expressions were validated when written; seconds included where they were allowed
        parsed = crontab.parse(schedule.cron, schedule.timezone, allow_seconds=True)
    except crontab.CronError as exc:
        log.error(
            "schedule paused: its expression no longer parses", schedule_id=str(schedule.id), error=str(exc)
        )
        return None
    return plan_fires(parsed, due_at=due_at, now=now, grace_s=grace_s)
