"""Durable composition: what a suspended attempt means, for in-process and remote workers alike.

A handler that reaches `ctx.sleep`, `ctx.wait_signal` or `ctx.gather` (or that spawned children
and returned) ends its attempt with a `Suspension`: the steps it produced, the children to create,
and what to wait for. `suspend` writes all of it in one transaction guarded by the attempt's lease
— steps, children (through submit's rules: contract, quota, defaults), the parent's new status —
so a suspension either happened entirely or not at all. In-process workers call it from the
executor; remote workers' `suspended` completions call it from app/src/api/workers.

Resuming re-runs the handler from the top with what was stored (`DurableState`): completed steps
return their results, a finished sleep returns, a delivered signal returns its data, children
report their status and result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from app.src.api.engine import submit
from app.src.api.errors import AppError, TooManyRequests
from app.src.api.models.tasks import MAX_DELAY_S, SignalName
from app.src.api.state_machine import Status, transition
from app.src.database import durable as store
from app.src.database import tasks as task_store
from app.src.database.durable import MAX_CHILDREN, MAX_STATE_BYTES, MAX_STEPS, Composed
from app.src.utils import json_text

if TYPE_CHECKING:
    from app.src.api.engine.task_engine import TaskEngine

MAX_STEP_RESULT_BYTES = 1024 * 1024
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class ChildSpec:
    key: str
    kind: str
    payload: dict[str, Any]
    queue: str
    priority: int | None = None
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    type: Literal["sleep", "signal", "children"]
    name: str | None = None
    seconds: float | None = None  # a sleep's length, a signal's timeout (None: no timeout)


@dataclass(frozen=True, slots=True)
class Suspension:
    steps: Mapping[str, Any] = field(default_factory=dict)
    spawn: list[ChildSpec] = field(default_factory=list)
    wait: Wait | None = None  # None: resume at once (new steps or children to record first)


class Suspended(BaseException):
    """Raised inside a handler to end its attempt with a suspension. A BaseException, so a
    handler's `except Exception` cannot swallow it."""

    def __init__(self, suspension: Suspension) -> None:
        super().__init__("suspended")
        self.suspension = suspension


class CompositionError(Exception):
    """What a suspension asked for cannot be done (a limit, an invalid child): the task fails
    for good with this message."""


class SpawnRefused(Exception):
    """The client's quota has no room for the children now: the attempt fails and is retried no
    sooner than `retry_after_s`, as an enqueue would be answered 429 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_name(what: str, name: str) -> str:
    """A step's, wait's or child's name as stored: 1 to 200 characters, none of them NUL (which
    PostgreSQL cannot store: the whole suspension would fail, not only this task)."""
    if not name or len(name) > MAX_NAME or "\x00" in name:
        raise CompositionError(f"a {what} must be 1 to {MAX_NAME} characters, none of them NUL")
    return name


def check_wait(wait: Wait | None) -> None:
    """A sleep's length and a signal wait's timeout: at most MAX_DELAY_S (366 days), as a delay
    asked over HTTP is. Past what the database's time range holds (or not a number) the
    suspension's statement would fail, again at every run of the task."""
    if wait is None or wait.seconds is None or wait.type == "children":
        return
    if not math.isfinite(wait.seconds) or wait.seconds > MAX_DELAY_S:
        what = "sleep" if wait.type == "sleep" else "signal wait's timeout"
        raise CompositionError(
            f"the {what} {str(wait.name)[:MAX_NAME]!r} is {wait.seconds} s; it may be at most "
            f"{MAX_DELAY_S} s (366 days)"
        )


def step_named_like_a_wait(name: str) -> str:
    return (
        f"the step {name[:MAX_NAME]!r} has the name of a sleep or signal wait of this task: "
        "each needs a name of its own"
    )


def check_step_result(name: str, value: Any) -> int:
    """A step's result is JSON of at most 1 MiB (a permanent error otherwise); its size in bytes,
    what it counts toward MAX_STATE_BYTES."""
    check_name("step name", name)
    try:
        text = json_text.storable(value)
    except ValueError as exc:
        raise CompositionError(f"step {name!r} returned what cannot be stored: {exc}") from None
    size = len(text.encode())
    if size > MAX_STEP_RESULT_BYTES:
        raise CompositionError(f"step {name!r} returned more than 1 MiB of JSON")
    return size


def state_full(name: str) -> str:
    """Why a step that would take its task's stored state past MAX_STATE_BYTES fails the task for
    good (in-process checkpoints and suspensions, in-process and remote, alike)."""
    return (
        f"step {name[:MAX_NAME]!r} does not fit: a task's steps and signals may hold at most "
        f"{MAX_STATE_BYTES // (1024 * 1024)} MiB of JSON in all"
    )


def check_state_size(held: int, sizes: Mapping[str, int]) -> None:
    """New steps (their sizes, from check_step_result) on top of the `held` bytes a task's state
    holds: CompositionError naming the first one past MAX_STATE_BYTES (every claim loads the whole
    state into its worker)."""
    total = held
    for name, size in sizes.items():
        total += size
        if total > MAX_STATE_BYTES:
            raise CompositionError(state_full(name))


async def suspend(
    engine: TaskEngine,
    *,
    task_id: UUID,
    client_id: UUID,
    attempt: int,
    worker_id: UUID,
    suspension: Suspension,
) -> str | None:
    """Write a suspension; the task's new status, or None when the attempt no longer holds it.

    Raises CompositionError (the task fails for good) or SpawnRefused (the attempt fails and is
    retried), having written nothing."""
    sizes = {name: check_step_result(name, value) for name, value in suspension.steps.items()}
    check_wait(suspension.wait)
    children = await _prepare_children(engine, client_id, suspension.spawn)
    created: list[Any] = []
    async with engine.db.driver() as conn:
        async with conn.transaction():
            locked = await store.lock_running(conn, task_id=task_id, attempt=attempt, worker_id=worker_id)
            if locked is None:
                return None
            waits_step = suspension.wait is not None and suspension.wait.type in ("sleep", "signal")
            if locked.steps + len(suspension.steps) + int(waits_step) > MAX_STEPS:
                raise CompositionError(f"a task may hold at most {MAX_STEPS} steps")
            if locked.children + len(children) > MAX_CHILDREN:
                raise CompositionError(f"a task may have at most {MAX_CHILDREN} children")
            check_state_size(locked.state_bytes, sizes)
            await store.insert_steps(conn, task_id=task_id, steps=suspension.steps)
            if children:
                created = await store.insert_composed(
                    conn, [(new, Composed(parent_id=task_id, child_key=key)) for key, new in children]
                )
            status, waiting_for, run_at = await _decide(conn, task_id, suspension.wait)
            row = await store.suspend(
                conn,
                task_id=task_id,
                attempt=attempt,
                worker_id=worker_id,
                status=str(transition(Status.RUNNING, status)),
                waiting_for=waiting_for,
                run_at=run_at,
                new_children=len(created),
            )
        # counted as soon as the commit returns, not after the connection is back: a request cut
        # by its deadline (app/src/api/workers COMPLETE_DEADLINE_S) while releasing it keeps count
        if created:
            submit.accepted(engine, created)
    return None if row is None else str(row["status"])


async def _prepare_children(
    engine: TaskEngine, client_id: UUID, spawn: list[ChildSpec]
) -> list[tuple[str, Any]]:
    if not spawn:
        return []
    keys = [check_name("child's key", child.key) for child in spawn]
    if len(set(keys)) != len(keys):
        raise CompositionError("two children were spawned with the same key")
    if len(spawn) > MAX_CHILDREN:
        raise CompositionError(f"a task may have at most {MAX_CHILDREN} children")
    requests = [
        submit.TaskRequest(
            kind=child.kind,
            payload=child.payload,
            queue=child.queue,
            priority=child.priority,
            max_attempts=child.max_attempts,
        )
        for child in spawn
    ]
    # held to the client's own quota, as its enqueues are (None: the deployment's default)
    async with engine.db.driver() as conn:
        quotas = await task_store.client_quotas(conn, [client_id])
    submitter = submit.Submitter(client_id, quotas.get(client_id))
    try:
        new = await submit.prepare(engine, submitter, requests, field_prefix=lambda i: ("spawn", i))
    except TooManyRequests as exc:
        raise SpawnRefused(
            f"a child cannot be created now: {exc.detail}", retry_after_s=submit.QUOTA_RETRY_AFTER_S
        ) from None
    except AppError as exc:
        details = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in (exc.errors or []))
        raise CompositionError(
            f"a child cannot be created: {exc.detail}{' ' + details if details else ''}"
        ) from None
    return list(zip(keys, new, strict=True))


async def _decide(
    conn: Any, task_id: UUID, wait: Wait | None
) -> tuple[Status, dict[str, Any] | None, datetime | None]:
    """The parent's status, waiting_for and run_at for what it waits for."""
    if wait is None:
        return Status.AVAILABLE, None, None
    if wait.type == "sleep":
        name = check_name("sleep's name", wait.name or "")
        record = await store.record_wait(
            conn, task_id=task_id, name=name, key="sleep_until", seconds=max(0.0, wait.seconds or 0.0)
        )
        _own_record(record, "sleep", name)
        until = _timestamp(record.result, "sleep_until")
        if until is not None and until > record.now:
            return Status.SCHEDULED, None, until
        return Status.AVAILABLE, None, None
    if wait.type == "signal":
        name = _signal_name(wait.name or "")
        if await store.signal_stored(conn, task_id=task_id, name=name):
            return Status.AVAILABLE, None, None
        record = await store.record_wait(
            conn, task_id=task_id, name=name, key="wait_until", seconds=wait.seconds
        )  # no timeout: seconds None, and the deadline is null
        _own_record(record, "signal wait", name)
        result = record.result
        if isinstance(result, dict) and result.get("timed_out"):
            return Status.AVAILABLE, None, None
        deadline = _timestamp(result, "wait_until")
        waiting: dict[str, Any] = {"type": "signal", "name": name}
        if deadline is not None:
            waiting["timeout_at"] = deadline.isoformat()
        return Status.WAITING, waiting, None
    return Status.WAITING, {"type": "children"}, None


def wait_named_like_another(what: str, name: str) -> str:
    return (
        f"the {what} {name[:MAX_NAME]!r} has the name of another step, sleep or signal wait of this "
        "task: each needs a name of its own"
    )


def _own_record(record: store.WaitRecord, what: str, name: str) -> None:
    """A wait's name must be its own: under a step's name (or a wait's of the other sort) the
    stored row is not its record, so it would end at once and be reached again on every re-run."""
    if not record.own:
        raise CompositionError(wait_named_like_another(what, name))


_SIGNAL_NAME: TypeAdapter[str] = TypeAdapter(SignalName)


def _signal_name(name: str) -> str:
    """A signal wait's name must be one a signal can be sent to (POST .../signals/{name}):
    otherwise nothing could ever end the wait."""
    try:
        return _SIGNAL_NAME.validate_python(name)
    except ValidationError:
        raise CompositionError(
            f"the signal wait {name[:MAX_NAME]!r} can never be signalled: a signal name is 1 to 128 "
            "letters, digits and . _ : - (starting with a letter or digit)"
        ) from None


def _timestamp(result: Any, key: str) -> datetime | None:
    if not isinstance(result, dict) or not result.get(key):
        return None
    return datetime.fromisoformat(str(result[key]))
