"""The tasks service: enqueue (single, batch, idempotent, within quota), read, wait, cancel, retry."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import ValidationError

from app.src.api.errors import Conflict, NotFound, TooManyRequests, Unprocessable, field_errors, problem_type
from app.src.api.kinds import REGISTRY, TaskKind
from app.src.api.models.tasks import Attempt, Task, TaskIn
from app.src.api.state_machine import TERMINAL, Status, sources
from app.src.api.workers import remote_kinds
from app.src.api.workers.remote_kinds import validate_remote_payload
from app.src.database import tasks as store
from app.src.database.tasks import NewTask
from app.src.database.workers import RemoteKindRow
from app.src.utils import json_text
from app.src.utils.ids import uuid7, uuid7s
from app.src.utils.metrics import ENQUEUED

if TYPE_CHECKING:
    from app.database import Database
    from app.src.database.notifications import Notifier

MAX_IDEMPOTENCY_KEY = 255


def validate_payload(
    kind_name: str,
    payload: dict[str, Any],
    *,
    at: tuple[str | int, ...],
    context: Mapping[str, Any] | None = None,
    remote: Mapping[str, RemoteKindRow] | None = None,
) -> TaskKind[Any, Any] | RemoteKindRow:
    kind = REGISTRY.get(kind_name)
    if kind is None and remote is not None and kind_name in remote:
        validate_remote_payload(remote[kind_name], payload, at=at)
        return remote[kind_name]
    if kind is None:
        raise Unprocessable(
            f"Unknown task kind {kind_name!r}; GET /api/catalog/kinds lists them.",
            errors=[
                {
                    "field": ".".join(map(str, (*at, "kind"))),
                    "message": "unknown kind",
                    "type": "unknown_kind",
                }
            ],
        )
    try:
        kind.validate_payload(payload, context=context)
    except ValidationError as exc:
        raise Unprocessable(
            f"The payload does not match the contract of kind {kind_name!r}.",
            errors=field_errors(exc.errors(include_url=False, include_input=False), prefix=(*at, "payload")),
        ) from None
    if json_text.contains_nul(payload):
        raise Unprocessable(
            "The payload cannot be stored.",
            errors=[{"field": ".".join(map(str, (*at, "payload"))), "message": json_text.NUL_MESSAGE,
                     "type": "value_error"}],
        )  # fmt: skip
    return kind


def _request_hash(items: Sequence[TaskIn]) -> str:
    body = [item.model_dump(mode="json", exclude_unset=True) for item in items]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


async def enqueue(
    db: Database,
    *,
    client_id: UUID,
    items: Sequence[TaskIn],
    idempotency_key: str | None,
    max_queued_tasks: int,
    batch: bool,
    payload_context: Mapping[str, Any] | None = None,
) -> tuple[list[Task], bool]:
    """Validate and store tasks in one round trip; returns (tasks, replayed from an earlier request).

    All or nothing: one invalid item rejects the whole batch and stores nothing. `payload_context`
    is the runtime's validation context (Runtime.payload_context), the one workers use too.
    """
    unknown = {item.kind for item in items if REGISTRY.get(item.kind) is None}
    remote = await remote_kinds.lookup(db, client_id=client_id, names=unknown) if unknown else None
    kinds = [
        validate_payload(
            item.kind, item.payload, at=("tasks", i) if batch else (), context=payload_context, remote=remote
        )
        for i, item in enumerate(items)
    ]
    queues = {
        name: await db.queues.ensure(client_id=client_id, name=name) for name in {i.queue for i in items}
    }
    unfinished = await db.quotas.unfinished(client_id)
    if unfinished + len(items) > max_queued_tasks:
        raise TooManyRequests(
            f"This client holds {unfinished} unfinished tasks; its quota is {max_queued_tasks}.",
            retry_after=5,
        )
    new = [
        NewTask(
            id=task_id,
            client_id=client_id,
            queue_id=queues[item.queue].id,
            queue=item.queue,
            kind=item.kind,
            payload=item.payload,
            priority=item.priority,
            max_attempts=item.max_attempts or kind.max_attempts or queues[item.queue].max_attempts,
            run_at=item.run_at,
            delay_s=item.delay_s,
        )
        for item, kind, task_id in zip(items, kinds, uuid7s(len(items)), strict=True)
    ]
    if idempotency_key is None and not batch:
        tasks = [await db.task_inserts.submit(new[0])]
    elif idempotency_key is None:
        async with db.driver() as conn:
            tasks = await store.insert_tasks(conn, new)
    else:
        request_hash = _request_hash(items)
        async with db.driver() as conn, conn.transaction():
            if not await store.lock_idempotency_key(conn, client_id, idempotency_key):
                raise Conflict(
                    "A request with this Idempotency-Key is still in flight; retry shortly.",
                    type=problem_type("idempotency-in-flight"),
                )
            previous = await store.find_idempotency_key(conn, client_id, idempotency_key)
            if previous is not None:
                if previous[0] != request_hash:
                    raise Unprocessable(
                        "This Idempotency-Key was used with a different request body.",
                        type=problem_type("idempotency-key-reused"),
                    )
                return await store.get_tasks(conn, client_id=client_id, task_ids=previous[1]), True
            tasks = await store.insert_tasks(conn, new)
            await store.save_idempotency_key(
                conn, client_id, idempotency_key, request_hash, [t.id for t in tasks]
            )
    db.quotas.added(client_id, len(tasks))
    for task in tasks:
        ENQUEUED(task.queue, task.kind).inc()
    return tasks, False


async def enqueue_in_transaction(
    conn: Any,
    *,
    client_id: UUID,
    queue: str,
    kind: TaskKind[Any, Any],
    payload: dict[str, Any],
    priority: int = 5,
    delay_s: float | None = None,
) -> Task:
    """Enqueue from Python code inside the caller's open transaction (SQLAlchemy or asyncpg)."""
    from app.src.database import queues as queue_store

    executor = await _executor(conn)
    queue_row = await queue_store.ensure(executor, client_id=client_id, name=queue)
    [task] = await store.insert_tasks(
        executor,
        [
            NewTask(
                id=uuid7(),
                client_id=client_id,
                queue_id=queue_row.id,
                queue=queue,
                kind=kind.name,
                payload=payload,
                priority=priority,
                max_attempts=kind.max_attempts or queue_row.max_attempts,
                run_at=None,
                delay_s=delay_s,
            )
        ],
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


async def _executor(conn: Any) -> Any:
    if hasattr(conn, "exec_driver_sql"):
        return _SqlAlchemyExecutor(conn)
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue(db=...) must run inside the caller's open transaction")
    return conn


async def get(db: Database, *, client_id: UUID, task_id: UUID) -> Task:
    async with db.driver() as conn:
        task = await store.get_task(conn, client_id=client_id, task_id=task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.")
    return task


async def wait(db: Database, notifier: Notifier, *, client_id: UUID, task_id: UUID, timeout_s: float) -> Task:
    """The task once it is terminal or `timeout_s` passed, woken by notifications (not a sleep loop).

    A slow safety re-read every few seconds covers a notification lost to a reconnect.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with notifier.watch(task_id) as changed:
        while True:
            changed.clear()
            task = await get(db, client_id=client_id, task_id=task_id)
            remaining = deadline - loop.time()
            if Status(task.status) in TERMINAL or remaining <= 0:
                return task
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 5.0))


async def events(
    db: Database, notifier: Notifier, *, client_id: UUID, task_id: UUID, keepalive_s: float = 15.0
) -> AsyncIterator[dict[str, Any] | None]:
    """Status and progress changes of one task until it is terminal; None means 'send a keep-alive'."""
    last: tuple[str, Any, int] | None = None
    with notifier.watch(task_id) as changed:
        while True:
            changed.clear()
            task = await get(db, client_id=client_id, task_id=task_id)
            current = (task.status, task.progress, task.attempts)
            if current != last:
                yield {
                    "id": str(task.id),
                    "status": task.status,
                    "attempts": task.attempts,
                    "progress": task.progress,
                    "last_error": task.last_error,
                }
                last = current
            if Status(task.status) in TERMINAL:
                return
            try:
                await asyncio.wait_for(changed.wait(), timeout=keepalive_s)
            except TimeoutError:
                yield None


def encode_cursor(task_id: UUID) -> str:
    return base64.urlsafe_b64encode(task_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> UUID:
    try:
        return UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise Unprocessable(
            "The cursor is not one this API returned.",
            errors=[{"field": "query.cursor", "message": "invalid cursor", "type": "value_error"}],
        ) from None


async def list_tasks(
    db: Database,
    *,
    client_id: UUID,
    queue: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Task], str | None]:
    before = decode_cursor(cursor) if cursor else None
    async with db.driver() as conn:
        tasks = await store.list_tasks(
            conn, client_id=client_id, before=before, queue=queue, status=status, kind=kind, limit=limit + 1
        )
    next_cursor = encode_cursor(tasks[limit - 1].id) if len(tasks) > limit else None
    return tasks[:limit], next_cursor


async def attempts(db: Database, *, client_id: UUID, task_id: UUID) -> list[Attempt]:
    await get(db, client_id=client_id, task_id=task_id)  # tenancy: 404 for another client's task
    async with db.driver() as conn:
        return await store.list_attempts(conn, task_id=task_id)


async def cancel(db: Database, *, client_id: UUID, task_id: UUID) -> Task:
    """Cancel at once unless running; a running task is asked to stop (cooperative)."""
    async with db.driver() as conn:
        task = await store.cancel(conn, client_id=client_id, task_id=task_id)
    if task is not None:
        return task
    current = await get(db, client_id=client_id, task_id=task_id)
    raise Conflict(f"Task {task_id} is {current.status} and can no longer be cancelled.")


RETRYABLE_BY_CLIENT = [s for s in sources(Status.AVAILABLE) if s in (Status.DISCARDED, Status.CANCELLED)]


async def retry(db: Database, *, client_id: UUID, task_id: UUID) -> Task:
    """A discarded or cancelled task runs again from attempt one."""
    async with db.driver() as conn:
        task = await store.retry(
            conn, client_id=client_id, task_id=task_id, from_statuses=RETRYABLE_BY_CLIENT
        )
    if task is not None:
        db.quotas.added(client_id, 1)
        return task
    current = await get(db, client_id=client_id, task_id=task_id)
    raise Conflict(f"Task {task_id} is {current.status}; only discarded or cancelled tasks can be retried.")
