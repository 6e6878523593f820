"""Submit: the one path from a task request to a stored task.

`POST /api/tasks` (`submit_one`), the batch (`submit_batch`), schedule fires and triggers
(`prepare` + `store_prepared` + `accepted`, inside the firing transaction) and `TaskKind.enqueue`
(`submit_in_transaction`) all go through `prepare`, so each applies the same rules in the same
order: the kind's contract, the NUL check, the client's quota, and the defaults (`max_attempts`
from the request, else the kind, else the queue; priority 5). `accepted` then counts the stored
tasks against the quota and in the enqueue metric.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from pydantic import ValidationError

from app.src.api.engine import remote_kinds
from app.src.api.engine.task_engine import KindContract, SubmitRules, TaskEngine
from app.src.api.errors import (
    Conflict,
    TooManyQueues,
    TooManyRequests,
    Unprocessable,
    field_errors,
    problem_type,
)
from app.src.api.models.tasks import DebounceIn, Queue, Task, TaskIn
from app.src.database import durable as durable_store
from app.src.database import queues as queue_store
from app.src.database import tasks as task_store
from app.src.database.durable import Composed
from app.src.database.tasks import Debounce, Executor, NewTask
from app.src.utils import json_text, tracing
from app.src.utils.ids import uuid7s
from app.src.utils.metrics import ENQUEUED
from app.src.utils.records import record

MAX_IDEMPOTENCY_KEY = 255
DEFAULT_QUEUE = "default"  # every client has it: made whatever the cap on queues
MAX_CONCURRENCY_KEY = 128
QUOTA_RETRY_AFTER_S = 5

FieldPath = tuple[str | int, ...]


class HasMaxAttempts(Protocol):
    """A kind as the defaults see it: in-process (KindContract) or remote (RemoteKindRow)."""

    @property
    def max_attempts(self) -> int | None: ...


def own_fields(index: int) -> FieldPath:
    """Field errors of a single request name its own fields (`payload.url`)."""
    return ()


def batch_item(index: int) -> FieldPath:
    """Field errors of a batch name the item (`tasks.3.payload.url`)."""
    return ("tasks", index)


@record
class TaskRequest:
    """A task somebody wants created, before the rules fill in its defaults."""

    kind: str
    payload: dict[str, Any]
    queue: str = "default"
    priority: int | None = None
    max_attempts: int | None = None
    run_at: datetime | None = None
    delay_s: float | None = None
    schedule: dict[str, Any] | None = None  # the schedule fire that asks for it (ScheduleRef fields)
    concurrency_key: str | None = None
    debounce: DebounceIn | None = None
    depends_on: list[UUID] | None = None  # existing tasks of the same client that must complete first

    @classmethod
    def from_input(cls, item: TaskIn) -> TaskRequest:
        return cls(
            kind=item.kind,
            payload=item.payload,
            queue=item.queue,
            priority=item.priority,
            max_attempts=item.max_attempts,
            run_at=item.run_at,
            delay_s=item.delay_s,
            concurrency_key=item.concurrency_key,
            debounce=item.debounce,
            depends_on=list(dict.fromkeys(item.depends_on)) if item.depends_on else None,
        )


@dataclass(frozen=True, slots=True)
class Submitter:
    """Who asks: the tenant, and its own quota (None: the deployment's default)."""

    client_id: UUID
    max_queued_tasks: int | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    tasks: list[Task]
    replayed: bool  # an Idempotency-Key repeat: the tasks of the first request
    debounced: list[bool | None] | None = None  # per task, for enqueues with debounce

    @property
    def all_debounced(self) -> bool:
        return bool(self.debounced) and all(self.debounced or [])


# --- the rules -----------------------------------------------------------------------------------


def checked_kind(
    rules: SubmitRules, kind_name: str, payload: dict[str, Any], *, at: FieldPath = (), storable: bool = False
) -> KindContract:
    """The kind, once the payload fits its contract and can be stored (`storable`: known already);
    else a 422 naming fields under `at`."""
    kind = rules.kinds.get(kind_name)
    if kind is None:
        raise Unprocessable(
            f"Unknown task kind {kind_name!r}; GET /api/catalog/kinds lists them.",
            errors=[{"field": _dotted(*at, "kind"), "message": "unknown kind", "type": "unknown_kind"}],
        )
    try:
        kind.validate_payload(payload, context=rules.payload_context)
    except ValidationError as exc:
        raise Unprocessable(
            f"The payload does not match the contract of kind {kind_name!r}.",
            errors=field_errors(exc.errors(include_url=False, include_input=False), prefix=(*at, "payload")),
        ) from None
    if not storable:
        check_storable(payload, at=at)
    return kind


async def checked_template(
    engine: TaskEngine, *, client_id: UUID, kind_name: str, payload: dict[str, Any], at: FieldPath = ()
) -> None:
    """A task a schedule will enqueue: an in-process kind, or one of the client's remote kinds,
    whose payload fits its contract (else a 422 naming fields under `at`)."""
    if engine.rules.kinds.get(kind_name) is None:
        remote = await remote_kinds.lookup(engine.db, client_id=client_id, names=[kind_name])
        if kind_name in remote:
            remote_kinds.validate_remote_payload(remote[kind_name], payload, at=at)
            check_storable(payload, at=at)
            return
    checked_kind(engine.rules, kind_name, payload, at=at)


def check_storable(payload: dict[str, Any], *, at: FieldPath = ()) -> None:
    """PostgreSQL's jsonb cannot hold a NUL character: refuse it here as a 422, not a 500 later."""
    if json_text.contains_nul(payload):
        raise Unprocessable(
            "The payload cannot be stored.",
            errors=[
                {"field": _dotted(*at, "payload"), "message": json_text.NUL_MESSAGE, "type": "value_error"}
            ],
        )


def check_quota(rules: SubmitRules, submitter: Submitter, *, unfinished: int, adding: int) -> None:
    limit = submitter.max_queued_tasks or rules.default_max_queued_tasks
    if unfinished + adding > limit:
        raise TooManyRequests(
            f"This client holds {unfinished} unfinished tasks; its quota is {limit}.",
            retry_after=QUOTA_RETRY_AFTER_S,
        )


def new_tasks(
    rules: SubmitRules,
    submitter: Submitter,
    requests: Sequence[TaskRequest],
    kinds: Sequence[HasMaxAttempts | None],
    queues: dict[str, Queue],
    traceparent: str | None = None,
) -> list[NewTask]:
    """The rows to insert, with the defaults filled in."""
    return [
        NewTask(
            id=task_id,
            client_id=submitter.client_id,
            queue_id=queues[request.queue].id,
            queue=request.queue,
            kind=request.kind,
            payload=request.payload,
            priority=rules.default_priority if request.priority is None else request.priority,
            max_attempts=request.max_attempts
            or (kind.max_attempts if kind is not None else None)
            or queues[request.queue].max_attempts,
            run_at=request.run_at,
            delay_s=request.delay_s,
            schedule=request.schedule,
            concurrency_key=request.concurrency_key,
            debounce=None
            if request.debounce is None
            else Debounce(request.debounce.key, request.debounce.period_s, request.debounce.max_wait_s),
            traceparent=traceparent,
        )
        for request, kind, task_id in zip(requests, kinds, uuid7s(len(requests)), strict=True)
    ]


def _dotted(*parts: str | int) -> str:
    return ".".join(map(str, parts))


# --- the core ------------------------------------------------------------------------------------


async def prepare(
    engine: TaskEngine,
    submitter: Submitter,
    requests: Sequence[TaskRequest],
    *,
    field_prefix: Callable[[int], FieldPath] = own_fields,
    check_contract: bool = True,
    pending: int = 0,
    traceparent: str | None = None,
) -> list[NewTask]:
    """Check every rule and build the rows, storing nothing; all or nothing.

    Field errors of request `i` are named under `field_prefix(i)`. `check_contract=False` is for
    schedule fires: the schedule was checked when written, and a kind removed since is discarded
    by the worker with a clear error rather than silently skipped here. `pending` counts tasks of
    this client that the caller is about to store alongside (earlier schedules of one firing
    transaction).
    """
    rules = engine.rules
    # kinds this process does not declare may be the client's own remote kinds (JSON Schema)
    unknown = {request.kind for request in requests if rules.kinds.get(request.kind) is None}
    remote = await remote_kinds.lookup(engine.db, client_id=submitter.client_id, names=unknown)
    kinds: list[HasMaxAttempts | None] = []
    # one look at all the payloads; only when one may hold a NUL is each walked to name it
    storable = len(requests) > 1 and json_text.free_of_nul([request.payload for request in requests])
    # one budget for the schema checks of all the requests (a batch of 1,000, a suspension's
    # 10,000 children): per payload alone, they held the event loop for up to 1,000 s
    with remote_kinds.checks_within():
        for index, request in enumerate(requests):
            at = field_prefix(index)
            if request.kind in remote:
                if check_contract:
                    remote_kinds.validate_remote_payload(remote[request.kind], request.payload, at=at)
                if not storable:
                    check_storable(request.payload, at=at)
                kinds.append(remote[request.kind])
            elif check_contract:
                kinds.append(checked_kind(rules, request.kind, request.payload, at=at, storable=storable))
            else:
                if not storable:
                    check_storable(request.payload, at=at)
                kinds.append(rules.kinds.get(request.kind))
    queues = await ensure_queues(engine, submitter.client_id, requests, field_prefix)
    unfinished = await engine.quotas.unfinished(submitter.client_id)
    try:
        check_quota(rules, submitter, unfinished=unfinished + pending, adding=len(requests))
    except TooManyRequests:
        adding = await _adding(engine, submitter.client_id, requests, queues)
        if adding == len(requests):
            raise
        check_quota(rules, submitter, unfinished=unfinished + pending, adding=adding)
    return new_tasks(rules, submitter, requests, kinds, queues, traceparent)


async def _adding(
    engine: TaskEngine, client_id: UUID, requests: Sequence[TaskRequest], queues: dict[str, Queue]
) -> int:
    """How many tasks these requests would add, debounced ones counted once per key and not at
    all when a pending task of theirs (same queue and kind) holds the key: those only replace its
    payload, and at the quota they were refused 429 though they add nothing (as a repeated
    Idempotency-Key). Read only when the plain count is over the quota; the pending task may still
    start before the insert, which then adds it (the quota's counts are a few seconds old anyway)."""
    keyed = {r.debounce.key: r for r in requests if r.debounce is not None}
    if not keyed:
        return len(requests)
    async with engine.db.driver() as conn:
        held = await task_store.pending_debounced(conn, client_id=client_id, keys=sorted(keyed))
    new_keys = [key for key, r in keyed.items() if held.get(key) != (queues[r.queue].id, r.kind)]
    return sum(1 for r in requests if r.debounce is None) + len(new_keys)


async def ensure_queues(
    engine: TaskEngine,
    client_id: UUID,
    requests: Sequence[TaskRequest],
    field_prefix: Callable[[int], FieldPath] = own_fields,
) -> dict[str, Queue]:
    """The requests' queues, those new created: all of them within the client's cap, or none."""
    try:
        return await engine.queues.ensure_all(
            client_id=client_id,
            names={request.queue for request in requests},
            cap=engine.rules.max_queues,
            always=DEFAULT_QUEUE,
        )
    except queue_store.QueueLimitReached as refused:
        raise too_many_queues(refused, requests, field_prefix) from None


async def ensure_queues_within(
    conn: Executor,
    rules: SubmitRules,
    *,
    client_id: UUID,
    requests: Sequence[TaskRequest],
    field_prefix: Callable[[int], FieldPath] = own_fields,
) -> dict[str, Queue]:
    """`ensure_queues` on the caller's open transaction: the requests' queues, those new created
    in it, all of them within the client's cap, or none (409 too-many-queues naming the fields)."""
    try:
        return await queue_store.ensure_many(
            conn,
            client_id=client_id,
            names=list(dict.fromkeys(request.queue for request in requests)),
            cap=rules.max_queues,
            always=DEFAULT_QUEUE,
        )
    except queue_store.QueueLimitReached as refused:
        raise too_many_queues(refused, requests, field_prefix) from None


def too_many_queues(
    refused: queue_store.QueueLimitReached,
    requests: Sequence[TaskRequest],
    field_prefix: Callable[[int], FieldPath] = own_fields,
) -> TooManyQueues:
    new = set(refused.names)
    return TooManyQueues(
        f"This client has reached its cap of {refused.cap} queues (CLIENT_MAX_QUEUES): a task can "
        "go to a queue it has, but no new queue can be made. Nothing was stored.",
        errors=[
            {"field": _dotted(*field_prefix(i), "queue"), "message": f"queue {r.queue!r} would be "
             f"one more than the cap of {refused.cap}", "type": "too_many_queues"}
            for i, r in enumerate(requests) if r.queue in new
        ],
    )  # fmt: skip


async def store_prepared(
    conn: Executor,
    tasks: Sequence[NewTask],
    *,
    depends_on: Sequence[list[UUID] | None] = (),
    field_prefix: Callable[[int], FieldPath] = own_fields,
) -> list[Task]:
    """Insert prepared rows on the caller's connection (in its transaction, if it opened one).

    A debounced row may come back as the pending task of its debounce key (another id). Tasks with
    `depends_on` need that transaction: their dependencies are checked (same client, existing:
    else a 422) and locked until the dependents are stored, so none can finish unseen.
    """
    if any(depends_on):
        return await _store_dependents(conn, tasks, depends_on, field_prefix)
    if all(task.debounce is None for task in tasks):
        return await task_store.insert_tasks(conn, tasks)
    plain = [task for task in tasks if task.debounce is None]
    stored = {task.id: task for task in await task_store.insert_tasks(conn, plain)} if plain else {}
    # in key order, as every batch of them goes: each upsert locks its key's pending row until the
    # commit, and two batches that reached the same keys in opposite orders deadlocked (503)
    keyed = sorted(
        (task.debounce.key, index) for index, task in enumerate(tasks) if task.debounce is not None
    )
    for _, index in keyed:
        task = tasks[index]
        if task.debounce is not None:
            try:
                stored[task.id], _ = await task_store.debounce_task(conn, task)
            except task_store.DebounceKeyTaken:
                held = "held by a pending task of another queue or kind"
                raise Conflict(
                    f"This debounce key is {held}.",
                    errors=[{"field": _dotted(*field_prefix(index), "debounce", "key"), "message": held,
                             "type": "conflict"}],
                ) from None  # fmt: skip
    return [stored[task.id] for task in tasks]


async def _store_dependents(
    conn: Executor,
    tasks: Sequence[NewTask],
    depends_on: Sequence[list[UUID] | None],
    field_prefix: Callable[[int], FieldPath],
) -> list[Task]:
    both = [
        {"field": _dotted(*field_prefix(i), "debounce"), "message": "debounce cannot be combined with "
         "depends_on", "type": "value_error"}
        for i, (task, deps) in enumerate(zip(tasks, depends_on, strict=True)) if deps and task.debounce
    ]  # fmt: skip
    if both:
        raise Unprocessable("A task that depends on others cannot be debounced.", errors=both)
    wanted = [d for deps in depends_on if deps for d in deps]
    statuses = await durable_store.mark_dependencies(conn, client_id=tasks[0].client_id, ids=wanted)
    errors = [
        {"field": _dotted(*field_prefix(i), "depends_on", j), "message": "no such task of this client",
         "type": "unknown_task"}
        for i, deps in enumerate(depends_on) for j, d in enumerate(deps or ()) if d not in statuses
    ]  # fmt: skip
    if errors:
        raise Unprocessable("depends_on names tasks that do not exist (for this client).", errors=errors)
    return await durable_store.insert_composed(
        conn, [(task, _dependent(deps, statuses)) for task, deps in zip(tasks, depends_on, strict=True)]
    )


def debounced(new: Sequence[NewTask], tasks: Sequence[Task]) -> list[bool | None]:
    """Per task: None without debounce; True when an earlier pending task took the enqueue."""
    return [None if n.debounce is None else t.id != n.id for n, t in zip(new, tasks, strict=True)]


def _dependent(deps: list[UUID] | None, statuses: dict[UUID, str]) -> Composed:
    """A dependent's start: waiting for its open dependencies, or cancelled if one already failed."""
    if not deps:
        return Composed()
    failed = [d for d in deps if statuses[d] in ("discarded", "cancelled")]
    if failed:
        error = f"dependency {failed[0]} was {statuses[failed[0]]}"
        return Composed(depends_on=deps, status="cancelled", last_error=error)
    open_ = [d for d in deps if statuses[d] != "completed"]
    if not open_:
        return Composed(depends_on=deps)
    waiting = {"type": "dependencies", "task_ids": [str(d) for d in open_]}
    return Composed(depends_on=deps, status="waiting", waiting_for=waiting, deps_open=len(open_))


def accepted(engine: TaskEngine, tasks: Sequence[Task]) -> None:
    """Count stored tasks: against their client's quota, and in the enqueue metric."""
    per_client: dict[UUID, int] = {}
    per_series: dict[tuple[str, str], int] = {}
    for task in tasks:
        per_client[task.client_id] = per_client.get(task.client_id, 0) + 1
        per_series[task.queue, task.kind] = per_series.get((task.queue, task.kind), 0) + 1
    for client_id, n in per_client.items():
        engine.quotas.added(client_id, n)
    for (queue, kind), n in per_series.items():
        ENQUEUED(queue, kind).inc(n)


async def _submit(
    engine: TaskEngine,
    submitter: Submitter,
    items: Sequence[TaskIn],
    *,
    idempotency_key: str | None,
    field_prefix: Callable[[int], FieldPath],
    traceparent: str | None = None,
) -> Submitted:
    with tracing.enqueue_span(len(items), traceparent) as stored_traceparent:
        return await _submit_traced(
            engine, submitter, items, idempotency_key=idempotency_key, field_prefix=field_prefix,
            traceparent=stored_traceparent,
        )  # fmt: skip


async def _submit_traced(
    engine: TaskEngine,
    submitter: Submitter,
    items: Sequence[TaskIn],
    *,
    idempotency_key: str | None,
    field_prefix: Callable[[int], FieldPath],
    traceparent: str | None,
) -> Submitted:
    if idempotency_key is not None:
        # A repeat answers with the first request's tasks whatever has changed since (the quota
        # now full, a kind's contract changed): only a new request is held to the rules.
        async with engine.db.driver() as conn:
            replay = await _replay(conn, submitter.client_id, idempotency_key, items)
        if replay is not None:
            return replay
    requests = [TaskRequest.from_input(item) for item in items]
    new = await prepare(engine, submitter, requests, field_prefix=field_prefix, traceparent=traceparent)
    # held from the quota check (prepare returns right after it) until the tasks are counted
    engine.quotas.reserve(submitter.client_id, len(new))
    try:
        return await _store_new(engine, submitter, items, requests, new, idempotency_key, field_prefix)
    finally:
        engine.quotas.release(submitter.client_id, len(new))


async def _store_new(
    engine: TaskEngine,
    submitter: Submitter,
    items: Sequence[TaskIn],
    requests: Sequence[TaskRequest],
    new: list[NewTask],
    idempotency_key: str | None,
    field_prefix: Callable[[int], FieldPath],
) -> Submitted:
    depends_on = [request.depends_on for request in requests]
    if idempotency_key is not None:
        stored = await _store_once(
            engine, submitter.client_id, idempotency_key, items, new, depends_on, field_prefix
        )
        if stored.replayed:
            return stored
        tasks = [
            t for t, flag in zip(stored.tasks, stored.debounced or [None] * len(new), strict=True) if not flag
        ]
        accepted(engine, tasks)
        return stored
    elif any(depends_on):
        async with engine.db.driver() as conn, conn.transaction():
            tasks = await store_prepared(conn, new, depends_on=depends_on, field_prefix=field_prefix)
    elif len(new) == 1 and new[0].debounce is None:
        tasks = [await engine.task_inserts.submit(new[0])]
    else:
        async with engine.db.driver() as conn, conn.transaction():
            tasks = await store_prepared(conn, new, field_prefix=field_prefix)
    flags = debounced(new, tasks)
    accepted(engine, [task for task, flag in zip(tasks, flags, strict=True) if not flag])
    return Submitted(tasks, replayed=False, debounced=flags if any(f is not None for f in flags) else None)


async def _store_once(
    engine: TaskEngine,
    client_id: UUID,
    key: str,
    items: Sequence[TaskIn],
    new: Sequence[NewTask],
    depends_on: Sequence[list[UUID] | None],
    field_prefix: Callable[[int], FieldPath],
) -> Submitted:
    """Store under an Idempotency-Key: once per key; a repeat returns the first request's tasks."""
    request_hash = _request_hash(items)
    async with engine.db.driver() as conn, conn.transaction():
        if not await task_store.lock_idempotency_key(conn, client_id, key):
            raise Conflict(
                "A request with this Idempotency-Key is still in flight; retry shortly.",
                type=problem_type("idempotency-in-flight"),
            )
        replay = await _replay(conn, client_id, key, items, request_hash=request_hash)
        if replay is not None:
            return replay
        tasks = await store_prepared(conn, new, depends_on=depends_on, field_prefix=field_prefix)
        await task_store.save_idempotency_key(conn, client_id, key, request_hash, [t.id for t in tasks])
    flags = debounced(new, tasks)
    return Submitted(tasks, replayed=False, debounced=flags if any(f is not None for f in flags) else None)


async def _replay(
    conn: Executor, client_id: UUID, key: str, items: Sequence[TaskIn], *, request_hash: str | None = None
) -> Submitted | None:
    """The first request's tasks when this key was used before; None when it was not."""
    previous = await task_store.find_idempotency_key(conn, client_id, key)
    if previous is None:
        return None
    if previous[0] != (request_hash or _request_hash(items)):
        raise Unprocessable(
            "This Idempotency-Key was used with a different request body.",
            type=problem_type("idempotency-key-reused"),
        )
    tasks = await task_store.get_tasks(conn, client_id=client_id, task_ids=previous[1])
    if len(tasks) < len(previous[1]):
        raise Conflict(
            "The tasks this Idempotency-Key created no longer exist (purged, or past their "
            "retention); send the request with a new key to enqueue it again.",
            type=problem_type("idempotency-tasks-gone"),
        )
    return Submitted(tasks, True)


def _request_hash(items: Sequence[TaskIn]) -> str:
    body = [item.model_dump(mode="json", exclude_unset=True) for item in items]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- entry points --------------------------------------------------------------------------------


async def submit_one(
    engine: TaskEngine,
    submitter: Submitter,
    item: TaskIn,
    *,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> Submitted:
    """`POST /api/tasks`: field errors name the request's own fields (`payload.url`)."""
    return await _submit(
        engine,
        submitter,
        [item],
        idempotency_key=idempotency_key,
        field_prefix=own_fields,
        traceparent=traceparent,
    )


async def submit_batch(
    engine: TaskEngine,
    submitter: Submitter,
    items: Sequence[TaskIn],
    *,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> Submitted:
    """`POST /api/tasks/batch`, all or nothing: field errors name the item (`tasks.3.payload.url`)."""
    return await _submit(
        engine,
        submitter,
        items,
        idempotency_key=idempotency_key,
        field_prefix=batch_item,
        traceparent=traceparent,
    )


class UnknownClient(LookupError):
    """`TaskKind.enqueue(client_id=...)` named a client that does not exist."""


async def submit_in_transaction(
    conn: Any,
    *,
    rules: SubmitRules,
    kind: KindContract,
    payload: dict[str, Any],
    client_id: UUID,
    queue: str,
    priority: int | None = None,
    delay_s: float | None = None,
    concurrency_key: str | None = None,
) -> Task:
    """`TaskKind.enqueue`: the same rules, on the caller's open transaction, so the task commits
    with the caller's data or not at all. The queue is created and the unfinished tasks counted in
    that transaction too (it sees what it already added; the API's caches cannot)."""
    executor = _in_transaction(conn)
    if concurrency_key is not None and not 1 <= len(concurrency_key) <= MAX_CONCURRENCY_KEY:
        raise ValueError(f"concurrency_key must be 1 to {MAX_CONCURRENCY_KEY} characters")
    request = TaskRequest(
        kind=kind.name,
        payload=payload,
        queue=queue,
        priority=priority,
        delay_s=delay_s,
        concurrency_key=concurrency_key,
    )
    kind.validate_payload(payload, context=rules.payload_context)
    check_storable(payload)
    quotas = await task_store.client_quotas(executor, [client_id])
    if client_id not in quotas:
        # a task nobody can see, list or cancel is worse than an error here
        raise UnknownClient(f"enqueue(client_id={client_id}): no API client has this id")
    queue_row = (await ensure_queues_within(executor, rules, client_id=client_id, requests=[request]))[queue]
    submitter = Submitter(client_id, quotas[client_id])
    unfinished = await task_store.count_unfinished(executor, client_id=client_id)
    check_quota(rules, submitter, unfinished=unfinished, adding=1)
    [task] = await store_prepared(
        executor, new_tasks(rules, submitter, [request], [kind], {queue: queue_row})
    )
    ENQUEUED(task.queue, task.kind).inc()
    return task


class _SqlAlchemyExecutor:
    """Runs the engine's $n statements through SQLAlchemy, so they join its transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        result = await self._conn.exec_driver_sql(query, args)
        return list(result.mappings().all()) if result.returns_rows else []


def _in_transaction(conn: Any) -> Executor:
    """The caller's SQLAlchemy connection or asyncpg connection, which must be in a transaction."""
    if hasattr(conn, "exec_driver_sql"):
        return _SqlAlchemyExecutor(conn)
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue(db=...) must run inside the caller's open transaction")
    executor: Executor = conn
    return executor


def normalize_idempotency_key(raw: str | None) -> str | None:
    """The Idempotency-Key header value (a structured-field string, quotes optional)."""
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise Unprocessable(
            "Idempotency-Key must be 1 to 255 printable characters.",
            errors=[{"field": "header.Idempotency-Key", "message": "invalid", "type": "value_error"}],
        )
    return key
