"""/api/schedules: cron schedules that enqueue a task template, per client.

Every route needs `schedules:admin`, reads included: a schedule is standing authority to enqueue
work, and its template may carry credentials (an `http` task's headers), so who may see it is who
may change it.
"""

from __future__ import annotations

from uuid import UUID

from quart import Blueprint
from quart_schema import validate_querystring, validate_request, validate_response

from app.middlewares import requires_scopes
from app.routes.context import client_id, db, engine, runtime, submitter
from app.src.api import schedules
from app.src.api.models.schedules import (
    ScheduleIn,
    ScheduleList,
    ScheduleListQuery,
    ScheduleOut,
    SchedulePatch,
)
from app.src.api.models.tasks import TaskOut

blueprint = Blueprint("schedules", __name__)
SCOPE = "schedules:admin"


def _allow_seconds() -> bool:
    return runtime().settings.schedule_seconds_allowed


@blueprint.post("")
@requires_scopes(SCOPE)
@validate_request(ScheduleIn)
@validate_response(ScheduleOut, 201)
@validate_response(ScheduleOut, 200)
async def create_schedule(data: ScheduleIn) -> tuple[ScheduleOut, int]:
    """Create a schedule; `next_run_at` is its first fire time in UTC.

    A bad cron expression or time zone is a 422 naming `body.cron` or `body.timezone`; the task
    payload is validated against its kind (`body.task.payload.*`). Names are unique per client: a
    schedule of that name that is exactly this one (name, cron, timezone, task, paused) is answered
    200 as it is (the same request sent again, its first answer lost); one that differs is a 409.
    The task's queue is made with the schedule, within the client's CLIENT_MAX_QUEUES: past it, a 409
    `urn:taskgate:problem:too-many-queues` naming `body.task.queue` (the same for a PATCH of `task`).
    """
    schedule, created = await schedules.create(
        engine(), client_id=client_id(), data=data, allow_seconds=_allow_seconds()
    )
    return ScheduleOut.from_domain(schedule), 201 if created else 200


@blueprint.get("")
@requires_scopes(SCOPE)
@validate_querystring(ScheduleListQuery)
@validate_response(ScheduleList)
async def list_schedules(query_args: ScheduleListQuery) -> ScheduleList:
    """List this client's schedules, newest first, with keyset pagination (`next_cursor`)."""
    items, next_cursor = await schedules.list_schedules(
        db(), client_id=client_id(), limit=query_args.limit, cursor=query_args.cursor
    )
    return ScheduleList(items=[ScheduleOut.from_domain(s) for s in items], next_cursor=next_cursor)


@blueprint.get("/<uuid:schedule_id>")
@requires_scopes(SCOPE)
@validate_response(ScheduleOut)
async def get_schedule(schedule_id: UUID) -> ScheduleOut:
    """Read a schedule."""
    return ScheduleOut.from_domain(await schedules.get(db(), client_id=client_id(), schedule_id=schedule_id))


@blueprint.patch("/<uuid:schedule_id>")
@requires_scopes(SCOPE)
@validate_request(SchedulePatch)
@validate_response(ScheduleOut)
async def update_schedule(schedule_id: UUID, data: SchedulePatch) -> ScheduleOut:
    """Change, pause (`paused: true`) or resume a schedule; omitted fields keep their values."""
    schedule = await schedules.update(
        engine(), client_id=client_id(), schedule_id=schedule_id, data=data, allow_seconds=_allow_seconds()
    )
    return ScheduleOut.from_domain(schedule)


@blueprint.delete("/<uuid:schedule_id>")
@requires_scopes(SCOPE)
@validate_response(ScheduleOut)
async def delete_schedule(schedule_id: UUID) -> ScheduleOut:
    """Delete a schedule; the answer is the schedule as it was. Tasks it already made are kept.

    The same delete sent again (its first answer lost) is answered the same, for as long as
    idempotency keys are kept (IDEMPOTENCY_RETENTION_HOURS); then, or for any other id, a 404.
    """
    return ScheduleOut.from_domain(
        await schedules.delete(db(), client_id=client_id(), schedule_id=schedule_id)
    )


@blueprint.post("/<uuid:schedule_id>/trigger")
@requires_scopes(SCOPE)
@validate_response(TaskOut, 201)
async def trigger_schedule(schedule_id: UUID) -> tuple[TaskOut, int]:
    """Enqueue the schedule's task now (paused or not); the task's `schedule.manual` is true."""
    task = await schedules.trigger(engine(), submitter(), schedule_id=schedule_id)
    return TaskOut.from_domain(task), 201
