"""/api/tasks: enqueue, follow, list, cancel and retry tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import structlog
from quart import Blueprint, Response, ResponseReturnValue, make_response, request
from quart_schema import document_response, validate_querystring, validate_request, validate_response

from app.database import StorageUnavailable
from app.middlewares import header, not_authenticated, requires_scopes, still_allowed
from app.routes.context import (
    client_id,
    db,
    engine,
    notifier,
    runtime,
    submitter,
    tenant,
)
from app.runtime import SHUTDOWN_RETRY_AFTER_S
from app.src.api import bulk, tasks
from app.src.api.engine import flow, submit
from app.src.api.models.common import PageQuery
from app.src.api.models.tasks import (
    AttemptList,
    AttemptOut,
    BulkIn,
    BulkOut,
    SignalIn,
    SignalOut,
    StepList,
    StepListQuery,
    StepOut,
    TaskBatchIn,
    TaskBatchOut,
    TaskEvent,
    TaskIn,
    TaskList,
    TaskListQuery,
    TaskOut,
    WaitQuery,
    task_body,
)
from app.src.api.state_machine import Status
from app.src.utils import json_provider, sse

blueprint = Blueprint("tasks", __name__)
log = structlog.get_logger("taskgate.http")
SHUTDOWN_EVENT = sse.shutdown_event(SHUTDOWN_RETRY_AFTER_S)


def json_response(body: dict[str, Any], status: int) -> Response:
    """The enqueue routes answer with `task_body` dicts (documented as TaskOut / TaskBatchOut)."""
    return Response(json_provider.dumps_parsed(body), status=status, content_type="application/json")


def _idempotency_key() -> str | None:
    return submit.normalize_idempotency_key(header("Idempotency-Key"))


@blueprint.post("")
@requires_scopes("tasks:write")
@validate_request(TaskIn)
@document_response(TaskOut, 201)
@document_response(TaskOut, 200)
async def create_task(data: TaskIn) -> Response:
    """Enqueue a task.

    With an Idempotency-Key, a repeat of the same request returns the original task (200). With
    `debounce`, an enqueue that meets a pending task of the same debounce key replaces its payload
    and run_at and answers that task (200, `"debounced": true`).
    """
    created = await submit.submit_one(
        engine(), submitter(), data, idempotency_key=_idempotency_key(), traceparent=header("traceparent")
    )
    flag = created.debounced[0] if created.debounced else None
    return json_response(
        task_body(created.tasks[0], debounced=flag), 200 if created.replayed or flag else 201
    )


@blueprint.post("/batch")
@requires_scopes("tasks:write")
@validate_request(TaskBatchIn)
@document_response(TaskBatchOut, 201)
@document_response(TaskBatchOut, 200)
async def create_batch(data: TaskBatchIn) -> Response:
    """Enqueue up to 1000 tasks in one round trip: all or nothing."""
    created = await submit.submit_batch(
        engine(),
        submitter(),
        data.tasks,
        idempotency_key=_idempotency_key(),
        traceparent=header("traceparent"),
    )
    flags = created.debounced or [None] * len(created.tasks)
    items = [task_body(t, debounced=flag) for t, flag in zip(created.tasks, flags, strict=True)]
    return json_response({"items": items}, 200 if created.replayed or created.all_debounced else 201)


@blueprint.get("/<uuid:task_id>")
@requires_scopes("tasks:read")
@validate_querystring(WaitQuery)
@validate_response(TaskOut)
async def get_task(task_id: UUID, query_args: WaitQuery) -> TaskOut | tuple[TaskOut, int, dict[str, str]]:
    """Read a task; `?wait=S` long-polls until it is terminal or S seconds pass.

    A task that is not running says why in `blocked_by` (the rules the claim applies, read now).

    A server that is shutting down ends a long-poll at once with the task's current state and a
    `Retry-After` header: poll again (another replica answers)."""
    if not query_args.wait:
        task = await tasks.get(db(), client_id=client_id(), task_id=task_id)
        return TaskOut.from_domain(task, blocked_by=await flow.blocked_by(db(), task))
    stopping = runtime().shutting_down
    task = await tasks.wait(
        db(), notifier(), client_id=client_id(), task_id=task_id, timeout_s=query_args.wait, stopping=stopping
    )
    if not await still_allowed("tasks:read")():
        raise not_authenticated()  # its key was revoked (its client disabled) while it waited
    out = TaskOut.from_domain(task, blocked_by=await flow.blocked_by(db(), task))
    if stopping.is_set():
        return out, 200, {"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}
    return out


@blueprint.get("")
@requires_scopes("tasks:read")
@validate_querystring(TaskListQuery)
@validate_response(TaskList)
async def list_tasks(query_args: TaskListQuery) -> TaskList:
    """List this client's tasks, newest first, with keyset pagination (`next_cursor`).

    An operator session may name any client with `client_id`.
    """
    items, next_cursor = await tasks.list_tasks(
        db(),
        client_id=tenant(query_args.client_id),
        queue=query_args.queue,
        status=query_args.status,
        kind=query_args.kind,
        limit=query_args.limit,
        cursor=query_args.cursor,
    )
    return TaskList(items=[TaskOut.from_domain(t) for t in items], next_cursor=next_cursor)


@blueprint.get("/<uuid:task_id>/attempts")
@requires_scopes("tasks:read")
@validate_querystring(PageQuery)
@validate_response(AttemptList)
async def list_attempts(task_id: UUID, query_args: PageQuery) -> AttemptList:
    """The finished attempts of a task, in the order they ended: outcome, HTTP status, error,
    duration; in pages of `limit` (`next_cursor`)."""
    items, next_cursor = await tasks.attempts(
        db(), client_id=client_id(), task_id=task_id, limit=query_args.limit, cursor=query_args.cursor
    )
    return AttemptList(
        items=[AttemptOut.model_validate(a, from_attributes=True) for a in items], next_cursor=next_cursor
    )


@blueprint.get("/<uuid:task_id>/events")
@requires_scopes("tasks:read")
@document_response(TaskEvent, 200)
async def task_events(task_id: UUID) -> ResponseReturnValue:
    """Server-sent events: the task's status changes and progress, until it is terminal.

    Composed tasks also send `event: step` {id, name, at}, `event: signal` {id, name, at},
    `event: child` {id, key, child_id, status, at} and `event: suspended` {id, attempt, at}.

    A `text/event-stream` of `event: task` messages whose data is the object documented here.
    Every message carries an SSE `id` (opaque: send it back, do not parse it). A request with a
    `Last-Event-ID` header resumes after that message, as EventSource does by itself: the current
    state comes only if it changed since, and every composition event not yet sent follows, none
    twice. Without one (or with an id this server did not write) the stream starts with the
    task's current state and its composition events so far. A
    server that is shutting down ends the stream with `event: shutdown` (data `{"retry_after_s":
    1}`, and the SSE `retry` field): reconnect, another replica answers. One whose database goes
    away ends it with `event: unavailable` (the same data and `retry`).
    """
    await tasks.get(db(), client_id=client_id(), task_id=task_id)  # 404 before the stream opens
    stopping = runtime().shutting_down
    stream_of = tasks.events(
        db(),
        notifier(),
        client_id=client_id(),
        task_id=task_id,
        stopping=stopping,
        last_event_id=request.headers.get("Last-Event-ID"),
    )
    allowed = still_allowed("tasks:read")  # the stream's token still opens it

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for frame in sse.frames(stream_of, allowed=allowed):
                yield frame
        except StorageUnavailable as error:
            log.warning("event stream ended: database unavailable", error=str(error))
            yield sse.unavailable_event(error.retry_after_s)
            return
        if stopping.is_set():
            # the server is shutting down: say so, and when to reconnect, then end the stream
            yield SHUTDOWN_EVENT

    response = await make_response(
        stream(),
        200,
        {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # type: ignore[union-attr]
    return response


@blueprint.get("/<uuid:task_id>/steps")
@requires_scopes("tasks:read")
@validate_querystring(StepListQuery)
@validate_response(StepList)
async def list_steps(task_id: UUID, query_args: StepListQuery) -> StepList:
    """The steps a task stored: `ctx.step` results, and its sleeps and signal waits, in pages
    (keyset: `next_cursor`) of at most `limit` steps and 4 MiB of results."""
    rows, next_cursor = await tasks.steps(
        db(), client_id=client_id(), task_id=task_id, limit=query_args.limit, cursor=query_args.cursor
    )
    return StepList(
        items=[StepOut(name=r["name"], result=r["result"], created_at=r["created_at"]) for r in rows],
        next_cursor=next_cursor,
    )


@blueprint.post("/<uuid:task_id>/signals/<name>")
@requires_scopes("tasks:write")
@validate_request(SignalIn)
@validate_response(SignalOut, 202)
async def send_signal(task_id: UUID, name: str, data: SignalIn) -> tuple[SignalOut, int]:
    """Send a signal to a task: delivered to `ctx.wait_signal(name)`, kept until it waits for it."""
    checked = tasks.signal_name(name, field="path.name")
    status = await tasks.signal(db(), client_id=client_id(), task_id=task_id, name=checked, data=data.data)
    return SignalOut(task_id=task_id, name=checked, status=Status(status)), 202


@blueprint.post("/<uuid:task_id>/cancel")
@requires_scopes("tasks:write")
@validate_response(TaskOut)
async def cancel_task(task_id: UUID) -> TaskOut:
    """Cancel a task: at once unless running; a running task is asked to stop."""
    return TaskOut.from_domain(await tasks.cancel(db(), client_id=client_id(), task_id=task_id))


@blueprint.post("/<uuid:task_id>/retry")
@requires_scopes("tasks:write")
@validate_response(TaskOut)
async def retry_task(task_id: UUID) -> TaskOut:
    """Run a discarded or cancelled task again, from attempt one."""
    return TaskOut.from_domain(
        await tasks.retry(engine(), client_id=client_id(), task_id=task_id, submitter=submitter())
    )


def _bulk_filter(data: BulkIn) -> bulk.TaskFilter:
    return bulk.TaskFilter(
        client_id=client_id(),  # own tasks only, whoever asks
        queue=data.filter.queue,
        kind=data.filter.kind,
        status=None if data.filter.status is None else str(data.filter.status),
        created_before=data.filter.created_before,
        created_after=data.filter.created_after,
    )


@blueprint.post("/bulk/retry")
@requires_scopes("tasks:write")
@validate_request(BulkIn)
@validate_response(BulkOut)
async def bulk_retry(data: BulkIn) -> BulkOut:
    """Run this client's discarded or cancelled tasks that match the filter again, from attempt one.

    Chunked (one short statement per 1,000 tasks) and bounded (100,000 per call, and what the
    client's quota of unfinished tasks has room for: 429 when none; call again for the rest);
    `count` says how many.
    """
    return BulkOut(count=await bulk.retry(engine(), where=_bulk_filter(data), submitter=submitter()))


@blueprint.post("/bulk/cancel")
@requires_scopes("tasks:write")
@validate_request(BulkIn)
@validate_response(BulkOut)
async def bulk_cancel(data: BulkIn) -> BulkOut:
    """Cancel this client's unfinished tasks that match the filter (running ones are asked to stop).

    Chunked and bounded like bulk retry; `count` says how many.
    """
    return BulkOut(count=await bulk.cancel(db(), where=_bulk_filter(data)))
