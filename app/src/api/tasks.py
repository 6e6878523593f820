"""The tasks service: read, wait, follow, list, cancel and retry (creating tasks is engine/submit.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from app.database import Database
from app.src.api import pages
from app.src.api.engine import remote_kinds
from app.src.api.engine.submit import Submitter, check_quota
from app.src.api.engine.task_engine import TaskEngine
from app.src.api.errors import Conflict, NotFound, Unprocessable
from app.src.api.models.tasks import Attempt, SignalName, Task
from app.src.api.state_machine import TERMINAL, Status, sources
from app.src.database import durable as durable_store
from app.src.database import tasks as task_store
from app.src.database.notifications import Notifier


async def get(db: Database, *, client_id: UUID, task_id: UUID) -> Task:
    async with db.driver() as conn:
        task = await task_store.get_task(conn, client_id=client_id, task_id=task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.")
    return task


async def wait(
    db: Database,
    notifier: Notifier,
    *,
    client_id: UUID,
    task_id: UUID,
    timeout_s: float,
    stopping: asyncio.Event | None = None,
) -> Task:
    """The task once it is terminal or `timeout_s` passed, woken by notifications (not a sleep loop).

    A slow safety re-read every few seconds covers a notification lost to a reconnect. Once
    `stopping` is set (the server is shutting down) it answers at once with the current state.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with notifier.watch(task_id) as changed:
        while True:
            changed.clear()
            task = await get(db, client_id=client_id, task_id=task_id)
            remaining = deadline - loop.time()
            if Status(task.status) in TERMINAL or remaining <= 0 or _is_set(stopping):
                return task
            await _changed_or_stopping(changed, stopping, within_s=min(remaining, notifier.recheck_s))


async def events(
    db: Database,
    notifier: Notifier,
    *,
    client_id: UUID,
    task_id: UUID,
    keepalive_s: float = 15.0,
    stopping: asyncio.Event | None = None,
    last_event_id: str | None = None,
) -> AsyncIterator[dict[str, Any] | None]:
    """Status and progress changes of one task until it is terminal; None means 'send a keep-alive'.

    Each event carries `sse_id`, the stream's position after it (an opaque cursor, see
    `_Position`). Given one as `last_event_id` (a reconnecting client's `Last-Event-ID`), the
    stream resumes after it: the current state only if it is not the one the cursor names, the
    composition events the cursor does not name. Once `stopping` is set (the server is shutting
    down) it ends after the current state."""
    position = _Position.decode(last_event_id)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    history = _History(position)
    with notifier.watch(task_id) as changed:
        while True:
            changed.clear()
            task = await get(db, client_id=client_id, task_id=task_id)
            for event in await history.new(db, task):
                yield event
            current = _state_of(task)
            if current != position.state:
                position.state = current
                yield {
                    "id": str(task.id),
                    "status": task.status,
                    "attempts": task.attempts,
                    "progress": task.progress,
                    "last_error": task.last_error,
                    "sse_id": position.encode(),
                }
                sent_at = loop.time()
            if Status(task.status) in TERMINAL or _is_set(stopping):
                return
            quiet_s = loop.time() - sent_at
            if quiet_s >= keepalive_s:
                yield None
                sent_at = loop.time()
                continue
            within_s = min(keepalive_s - quiet_s, notifier.recheck_s)
            await _changed_or_stopping(changed, stopping, within_s=within_s)


def _state_of(task: Task) -> list[Any]:
    """What a state event told: attempts, status and a digest of the progress (which may be big)."""
    progress = json.dumps(task.progress, sort_keys=True, separators=(",", ":"), default=str)
    return [task.attempts, task.status, _digest(progress)]


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b(text.encode(), digest_size=6).digest()).decode()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class _Position:
    """Where an event stream is, as its SSE `id`: the state event last sent (attempts, status,
    progress digest), the newest composition event's time (`since`), the time at or before which
    every composition event counts as sent (`floor`), and digests of those sent after the floor.

    Composition events are read from `since - SLACK` (children finish in their own transactions,
    with their own now(), so one may show up after a later one), and those whose digest is named
    are not sent again. At most KEEP digests ride along; past that the floor moves up."""

    KEEP = 128

    def __init__(self) -> None:
        self.state: list[Any] | None = None
        self.since: datetime | None = None
        self.floor: datetime | None = None
        self.sent: dict[str, datetime] = {}  # digest -> the event's time, for those past the floor

    def lower(self, slack: timedelta) -> datetime | None:
        """The time after which composition events may not all have been sent."""
        bounds = [at for at in (self.since and self.since - slack, self.floor) if at is not None]
        return max(bounds) if bounds else None

    def add(self, key: str, at: datetime, slack: timedelta) -> None:
        self.since = max(self.since or at, at)
        self.sent[_digest(key)] = at
        lower = self.lower(slack)
        kept = sorted(self.sent.items(), key=lambda item: item[1])
        if len(kept) > self.KEEP:
            self.floor = kept[-self.KEEP - 1][1]
            lower = self.lower(slack)
        self.sent = {k: t for k, t in kept if lower is None or t > lower}

    def encode(self) -> str:
        fields = [
            self.state,
            self.since and _micros(self.since),
            self.floor and _micros(self.floor),
            {k: _micros(t) for k, t in self.sent.items()},
        ]
        text = json.dumps(fields, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str | None) -> _Position:
        """The position a `Last-Event-ID` names; the start (everything to send) for none, or one
        this server did not write (a client's own, another version's)."""
        position = cls()
        if not cursor:
            return position
        try:
            fields = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            state, since, floor, sent = fields
            if state is not None:
                attempts, status, progress = state
                position.state = [int(attempts), str(status), str(progress)]
            position.since = None if since is None else _at(int(since))
            position.floor = None if floor is None else _at(int(floor))
            position.sent = {str(k): _at(int(t)) for k, t in dict(sent).items()}
        except (ValueError, TypeError, binascii.Error, OverflowError):
            return cls()
        return position


class _History:
    """What a task's composition did since the stream's position: steps stored, signals received,
    children finished, suspensions (each told once, as `event: step|signal|child|suspended`)."""

    SLACK = timedelta(seconds=5)  # children finish in their own transactions, with their own now()

    def __init__(self, position: _Position) -> None:
        self.position = position
        self.seen: set[str] = set()

    async def new(self, db: Database, task: Task) -> list[dict[str, Any]]:
        if not task.durable:  # no steps, signals or children stored yet: no history to read
            return []
        since = self.position.lower(self.SLACK) or task.created_at - self.SLACK
        async with db.driver() as conn:
            rows = await durable_store.history_since(conn, task_id=task.id, since=since)
        events = []
        for row in rows:
            key = f"{row['event']}\x00{row['child_id'] or row['name']}"
            if key in self.seen or _digest(key) in self.position.sent:
                continue
            self.seen.add(key)
            self.position.add(key, row["at"], self.SLACK)
            event: dict[str, Any] = {"event": row["event"], "id": str(task.id), "at": row["at"].isoformat()}
            if row["event"] == "child":
                event.update(key=row["name"], child_id=str(row["child_id"]), status=row["status"])
            elif row["event"] == "suspended":
                event.update(attempt=int(row["name"]))
            else:
                event.update(name=row["name"])
            event["sse_id"] = self.position.encode()
            events.append(event)
        return events


def _is_set(event: asyncio.Event | None) -> bool:
    return event is not None and event.is_set()


async def _changed_or_stopping(
    changed: asyncio.Event, stopping: asyncio.Event | None, *, within_s: float
) -> bool:
    """Wait until the task changed or the server stops; False when `within_s` passed first."""
    if stopping is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=within_s)
        return changed.is_set()
    waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waits:
            pending.cancel()
    return bool(done)


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
        tasks = await task_store.list_tasks(
            conn, client_id=client_id, before=before, queue=queue, status=status, kind=kind, limit=limit + 1
        )
    next_cursor = encode_cursor(tasks[limit - 1].id) if len(tasks) > limit else None
    return tasks[:limit], next_cursor


async def attempts(
    db: Database, *, client_id: UUID, task_id: UUID, limit: int, cursor: str | None
) -> tuple[list[Attempt], str | None]:
    """A page of a task's attempts, in the order they ended, and the next page's cursor. (A task's
    attempts are not bounded by its max_attempts: retries by hand and durable suspensions add more.)"""
    after = int(pages.decode(cursor, int)[0]) if cursor else None
    await get(db, client_id=client_id, task_id=task_id)  # tenancy: 404 for another client's task
    async with db.driver() as conn:
        found = await task_store.list_attempts(conn, task_id=task_id, after=after, limit=limit + 1)
    return pages.page(found, limit, lambda a: (a.seq or 0,))


async def cancel(db: Database, *, client_id: UUID, task_id: UUID) -> Task:
    """Cancel at once unless running; a running task is asked to stop (cooperative)."""
    async with db.driver() as conn:
        task = await task_store.cancel(conn, client_id=client_id, task_id=task_id)
    if task is not None:
        return task
    current = await get(db, client_id=client_id, task_id=task_id)
    raise Conflict(f"Task {task_id} is {current.status} and can no longer be cancelled.")


RETRYABLE_BY_CLIENT = [s for s in sources(Status.AVAILABLE) if s in (Status.DISCARDED, Status.CANCELLED)]


async def retry(
    engine: TaskEngine, *, client_id: UUID, task_id: UUID, submitter: Submitter | None = None
) -> Task:
    """A discarded or cancelled task runs again from attempt one and counts against the quota: a
    tenant's own retry (`submitter`) must fit in it, as an enqueue must (429 otherwise); an
    operator's (None) is not held to it. A task whose kind is gone (a remote kind its client
    deleted) is refused (409): no worker could ever run it."""
    current = await get(engine.db, client_id=client_id, task_id=task_id)  # 404 for another's task
    if engine.rules.kinds.get(current.kind) is None:
        found = await remote_kinds.lookup(engine.db, client_id=current.client_id, names=[current.kind])
        if current.kind not in found:
            raise Conflict(
                f"Task {task_id} is of kind {current.kind!r}, which is no longer registered (a remote kind "
                "deleted by its client): no worker could run it. Register the kind again "
                "(PUT /api/catalog/kinds/{name}), then retry."
            )
    if submitter is not None:
        check_quota(engine.rules, submitter, unfinished=await engine.quotas.unfinished(client_id), adding=1)
        engine.quotas.reserve(client_id, 1)
    try:
        async with engine.db.driver() as conn:
            task = await task_store.retry(
                conn, client_id=client_id, task_id=task_id, from_statuses=RETRYABLE_BY_CLIENT
            )
        if task is not None:
            engine.quotas.added(client_id, 1)
    finally:
        if submitter is not None:
            engine.quotas.release(client_id, 1)
    if task is not None:
        return task
    current = await get(engine.db, client_id=client_id, task_id=task_id)
    if current.status in RETRYABLE_BY_CLIENT:
        raise Conflict(
            f"A dependency of task {task_id} was discarded or cancelled; retry that one first "
            "(this task then waits for it again)."
        )
    raise Conflict(f"Task {task_id} is {current.status}; only discarded or cancelled tasks can be retried.")


# What one page of GET /api/tasks/{id}/steps carries at most in step results (it always carries
# one step, of at most 1 MiB): a task's whole state (up to durable_store.MAX_STATE_BYTES) is read
# a page at a time.
STEPS_PAGE_BYTES = 4 * 1024 * 1024


def _steps_cursor(created_at: datetime, name: str) -> str:
    return pages.encode((created_at.isoformat(), name))


def _after_step(cursor: str) -> tuple[datetime, str]:
    at, name = pages.decode(cursor, str, str)
    try:
        when = datetime.fromisoformat(str(at))
        # a time with no UTC reading (9999-12-31T23:59:59-14:00) would fail in the driver
        return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).astimezone(UTC), str(name)
    except (ValueError, OverflowError):
        raise pages.invalid_cursor() from None


async def steps(
    db: Database, *, client_id: UUID, task_id: UUID, limit: int, cursor: str | None
) -> tuple[list[Mapping[str, Any]], str | None]:
    """A page of the steps a task stored (ctx.step results, and its sleeps' and signal waits'
    records), and the cursor of the next page (None: this is the last)."""
    after = _after_step(cursor) if cursor else None
    await get(db, client_id=client_id, task_id=task_id)  # tenancy: 404 for another client's task
    async with db.driver() as conn:
        page = await durable_store.list_steps(
            conn, task_id=task_id, after=after, limit=limit, max_bytes=STEPS_PAGE_BYTES
        )
    last = page.items[-1] if page.items else None
    next_cursor = _steps_cursor(last["created_at"], last["name"]) if page.more and last else None
    return page.items, next_cursor


_SIGNAL_NAME: TypeAdapter[str] = TypeAdapter(SignalName)


def signal_name(name: str, *, field: str) -> str:
    """`name` if it is a valid signal name; otherwise a 422 that names `field` (where it came from)."""
    try:
        return _SIGNAL_NAME.validate_python(name)
    except ValidationError:
        raise Unprocessable(
            "A signal name is 1 to 128 letters, digits and . _ : - (starting with a letter or digit).",
            errors=[{"field": field, "message": "invalid signal name", "type": "value_error"}],
        ) from None


async def signal(db: Database, *, client_id: UUID, task_id: UUID, name: str, data: Any) -> str:
    """Keep a signal for the task (delivered to `ctx.wait_signal(name)`, now or when it waits);
    the task's status afterwards. A second signal of the same name with other data, one for a
    finished task, or one whose wait timed out, is a 409 and changes nothing. The same signal again
    (same name, same data: a request sent again after its answer was lost, a 503 after its commit)
    is answered as the first was, with the task's status now, and changes nothing."""
    async with db.driver() as conn:
        sent = await durable_store.send_signal(
            conn, client_id=client_id, task_id=task_id, name=name, data=data
        )
    if sent.task_status is None:
        raise NotFound(f"No task {task_id}.")
    if sent.repeated and not sent.stored:
        return sent.task_status
    if Status(sent.task_status) in TERMINAL:
        raise Conflict(f"Task {task_id} is {sent.task_status}; it can no longer receive signals.")
    if sent.timed_out:
        raise Conflict(f"Task {task_id}'s wait for signal {name!r} timed out; it can no longer receive it.")
    if sent.full == "bytes":
        bound_mib = durable_store.MAX_STATE_BYTES // (1024 * 1024)
        raise Conflict(
            f"Task {task_id}'s steps and signals hold {sent.state_bytes} bytes of JSON; this signal's "
            f"{sent.size} bytes would take them past the {bound_mib} MiB a task may hold. Nothing was "
            "kept: send less data (a reference to it, say)."
        )
    if sent.full == "pending":
        raise Conflict(
            f"Task {task_id} keeps {durable_store.MAX_PENDING_SIGNALS} signals that no wait has received "
            "yet; no more can be kept until it receives some."
        )
    if not sent.stored or sent.status is None:
        raise Conflict(f"Task {task_id} has already received a signal {name!r}.")
    return sent.status
