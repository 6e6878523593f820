"""Every API call the clients make, described once (`Call`); Client and AsyncClient send them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

from taskgate._core import Call, Confirm, adapter, dump, new_idempotency_key
from taskgate.models import (
    Attempt,
    Claim,
    CompletionAnswer,
    Heartbeat,
    Kind,
    Page,
    Queue,
    Schedule,
    Task,
    TaskPage,
    WorkerInfo,
)

TaskId = UUID | str
MAX_WAIT_S = 60.0  # the server's longest ?wait=
PAGE_LIMIT = 500  # the server's largest page: lists the clients read whole take fewest round trips

_TASK = adapter(Task)
_TASKS = adapter(dict[str, list[Task]])
_PAGE = adapter(TaskPage)
_ATTEMPTS = adapter(Page[Attempt])
_STEPS = adapter(Page[dict[str, Any]])
_QUEUE = adapter(Queue)
_QUEUES = adapter(Page[Queue])
_SCHEDULE = adapter(Schedule)
_SCHEDULES = adapter(Page[Schedule])
_KIND = adapter(Kind)
_KINDS = adapter(Page[Kind])
_CLAIM = adapter(Claim)
_HEARTBEAT = adapter(Heartbeat)
_COMPLETE = adapter(dict[str, list[CompletionAnswer]])
_WORKERS = adapter(Page[WorkerInfo])
_ANY = adapter(Any)


def _id(task_id: TaskId) -> str:
    return str(UUID(str(task_id)))


def _name(name: str) -> str:
    return quote(name, safe="")


def task_body(
    kind: str,
    payload: Any = None,
    *,
    queue: str | None = None,
    run_at: datetime | None = None,
    delay_s: float | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    concurrency_key: str | None = None,
    debounce: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "kind": kind,
        "payload": dump(payload) if payload is not None else {},
        "queue": queue,
        "run_at": run_at,
        "delay_s": delay_s,
        "priority": priority,
        "max_attempts": max_attempts,
        "concurrency_key": concurrency_key,
        "debounce": None if debounce is None else dict(debounce),
        **extra,
    }
    return {k: dump(v) for k, v in body.items() if v is not None}


def _idempotency(key: str | None, idempotent: bool) -> dict[str, str]:
    if key is None and not idempotent:
        return {}
    if key is not None and not key.strip():
        # (a blank key taken for "none" would make every call a new task: the opposite of asked)
        raise ValueError("idempotency_key must not be blank; pass None to have one made")
    return {"Idempotency-Key": key or new_idempotency_key()}


def enqueue(body: dict[str, Any], *, idempotency_key: str | None, idempotent: bool) -> Call[Task]:
    headers = _idempotency(idempotency_key, idempotent)
    return Call("POST", "/api/tasks", _TASK, json=body, headers=headers, once=not headers)


def enqueue_many(
    tasks: Sequence[Mapping[str, Any]], *, idempotency_key: str | None, idempotent: bool
) -> Call[dict[str, list[Task]]]:
    body = {"tasks": [dict(t) for t in tasks]}
    headers = _idempotency(idempotency_key, idempotent)
    return Call("POST", "/api/tasks/batch", _TASKS, json=body, headers=headers, once=not headers)


def get(task_id: TaskId, *, wait_s: float | None = None) -> Call[Task]:
    if not wait_s:  # a plain read: the client's own timeout
        return Call("GET", f"/api/tasks/{_id(task_id)}", _TASK)
    wait_s = min(wait_s, MAX_WAIT_S)
    # the long-poll answers within `wait` seconds: read for that long, and 10 s more
    return Call("GET", f"/api/tasks/{_id(task_id)}", _TASK, params={"wait": wait_s}, timeout=wait_s + 10)


def list_tasks(
    *, queue: str | None, status: str | None, kind: str | None, limit: int, cursor: str | None
) -> Call[TaskPage]:
    params = {"queue": queue, "status": status, "kind": kind, "limit": limit, "cursor": cursor}
    return Call("GET", "/api/tasks", _PAGE, params={k: v for k, v in params.items() if v is not None})


def _cancelled(task: Task) -> bool:
    return task.status == "cancelled" or task.cancel_requested


def cancel(task_id: TaskId) -> Call[Task]:
    # sent again (a 503, a lost answer), a cancel that the first send did is refused (409: the task
    # is cancelled); the task is read then, and returned if cancelled or asked to stop
    confirm = Confirm(get(task_id), _cancelled)
    return Call("POST", f"/api/tasks/{_id(task_id)}/cancel", _TASK, safe=True, confirm=confirm)


def retry(task_id: TaskId) -> Call[Task]:
    # never sent again once it may have been carried out: the task retried may have failed again
    # meanwhile, and a second retry would run it once more
    return Call("POST", f"/api/tasks/{_id(task_id)}/retry", _TASK, once=True)


def _page(cursor: str | None) -> dict[str, Any]:
    return {"limit": PAGE_LIMIT} if cursor is None else {"limit": PAGE_LIMIT, "cursor": cursor}


def attempts(task_id: TaskId, cursor: str | None = None) -> Call[Page[Attempt]]:
    return Call("GET", f"/api/tasks/{_id(task_id)}/attempts", _ATTEMPTS, params=_page(cursor))


def signal(task_id: TaskId, name: str, data: Any) -> Call[Any]:
    # the server answers the same signal (task, name, data) sent again as it did the first time
    path = f"/api/tasks/{_id(task_id)}/signals/{_name(name)}"
    return Call("POST", path, _ANY, json={"data": dump(data)}, safe=True)


def steps(task_id: TaskId, *, cursor: str | None = None) -> Call[Page[dict[str, Any]]]:
    # one page (at most 4 MiB of results); a server older than pages answers them all, no cursor
    params = None if cursor is None else {"cursor": cursor}
    return Call("GET", f"/api/tasks/{_id(task_id)}/steps", _STEPS, params=params)


def events_path(task_id: TaskId) -> str:
    return f"/api/tasks/{_id(task_id)}/events"


# Calls that set what they name to what they carry (a queue's settings, a kind's contract, a
# schedule's fields, paused or not): sent again after their answer was lost, they set the same
# again, so they are `safe` (sent again like reads).


def put_queue(name: str, settings: Mapping[str, Any]) -> Call[Queue]:
    return Call("PUT", f"/api/queues/{_name(name)}", _QUEUE, json=dump(settings), safe=True)


def get_queue(name: str) -> Call[Queue]:
    return Call("GET", f"/api/queues/{_name(name)}", _QUEUE)


def list_queues(cursor: str | None = None) -> Call[Page[Queue]]:
    return Call("GET", "/api/queues", _QUEUES, params=_page(cursor))


def queue_action(name: str, action: str) -> Call[Any]:
    # a purge sent again would delete the tasks enqueued since the first one did its work; a pause
    # or a resume sets the queue's `paused` again
    purge = action == "purge"
    return Call("POST", f"/api/queues/{_name(name)}/{action}", _ANY, once=purge, safe=not purge)


def create_schedule(
    name: str, cron: str, task: Mapping[str, Any], *, timezone: str, paused: bool
) -> Call[Schedule]:
    body = {"name": name, "cron": cron, "timezone": timezone, "task": dump(task), "paused": paused}
    # the server answers a schedule of that name that is exactly this one as it is (200)
    return Call("POST", "/api/schedules", _SCHEDULE, json=body, safe=True)


def list_schedules(cursor: str | None = None) -> Call[Page[Schedule]]:
    return Call("GET", "/api/schedules", _SCHEDULES, params=_page(cursor))


def schedule(method: str, schedule_id: TaskId, *, suffix: str = "", body: Any = None) -> Call[Schedule]:
    return Call(method, f"/api/schedules/{_id(schedule_id)}{suffix}", _SCHEDULE, json=body)


def update_schedule(schedule_id: TaskId, changes: Mapping[str, Any]) -> Call[Schedule]:
    # the fields given are set (the next fire time computed again only when the cron, the time
    # zone or `paused` changes it): the same changes sent again set the same
    path = f"/api/schedules/{_id(schedule_id)}"
    return Call("PATCH", path, _SCHEDULE, json=dump(changes), safe=True)


def delete_schedule(schedule_id: TaskId) -> Call[Schedule]:
    # the server answers a schedule it deleted as it was, the first time and when sent again
    return Call("DELETE", f"/api/schedules/{_id(schedule_id)}", _SCHEDULE, safe=True)


def trigger_schedule(schedule_id: TaskId) -> Call[Task]:
    # each trigger makes a task: never sent again once it may have made one (a 503 included)
    return Call("POST", f"/api/schedules/{_id(schedule_id)}/trigger", _TASK, once=True)


def kinds(cursor: str | None = None) -> Call[Page[Kind]]:
    return Call("GET", "/api/catalog/kinds", _KINDS, params=_page(cursor))


def register_kind(
    name: str,
    *,
    payload_schema: Mapping[str, Any],
    result_schema: Mapping[str, Any] | None,
    description: str | None,
    max_attempts: int | None,
) -> Call[Kind]:
    body = {
        "payload_schema": dict(payload_schema),
        "result_schema": None if result_schema is None else dict(result_schema),
        "description": description,
        "max_attempts": max_attempts,
    }
    return Call(
        "PUT",
        f"/api/catalog/kinds/{_name(name)}",
        _KIND,
        json={k: v for k, v in body.items() if v is not None},
        safe=True,  # the same contract registered again is not a new version
    )


def delete_kind(name: str) -> Call[None]:
    # sent again after its answer was lost (a 503 after the commit), the delete is answered 404:
    # the kind is gone, as asked, and the call returns
    return Call("DELETE", f"/api/catalog/kinds/{_name(name)}", None, safe=True, gone_when_absent=True)


def workers(cursor: str | None = None) -> Call[Page[WorkerInfo]]:
    return Call("GET", "/api/workers", _WORKERS, params=_page(cursor))


def claim(
    kinds: Sequence[str],
    *,
    worker: Mapping[str, Any],
    queues: Sequence[str] | None,
    max: int,
    wait_s: float,
) -> Call[Claim]:
    body: dict[str, Any] = {"kinds": list(kinds), "max": max, "wait_s": wait_s, "worker": dict(worker)}
    if queues:
        body["queues"] = list(queues)
    return Call("POST", "/api/workers/claim", _CLAIM, json=body, timeout=wait_s + 15)


def heartbeat(
    task_ids: Sequence[TaskId], *, worker: Mapping[str, Any], progress: Mapping[str, Any] | None = None
) -> Call[Heartbeat]:
    body: dict[str, Any] = {"task_ids": [_id(t) for t in task_ids], "worker": dict(worker)}
    if progress:
        body["progress"] = {_id(k): v for k, v in progress.items()}
    return Call("POST", "/api/workers/heartbeat", _HEARTBEAT, json=body)


def complete(
    items: Sequence[Mapping[str, Any]], *, worker: Mapping[str, Any]
) -> Call[dict[str, list[CompletionAnswer]]]:
    body = {
        "items": [{k: dump(v) for k, v in i.items() if v is not None} for i in items],
        "worker": dict(worker),
    }
    return Call("POST", "/api/workers/complete", _COMPLETE, json=body)
