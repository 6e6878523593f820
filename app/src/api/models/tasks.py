"""Task and queue contracts: what clients send and what they get back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.src.api.models.common import ListQuery, PageQuery, added_next_cursor
from app.src.api.state_machine import Status
from app.src.utils import json_text
from app.src.utils.records import record

QueueName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", examples=["default"])]
KindName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
MAX_DELAY_S = 366 * 86_400
# A task's result, as compact JSON: what a remote worker's completion can carry (the API takes 8 MiB
# request bodies, app/__init__.py), held to in-process handlers too. Each child's result is loaded
# by its parent's gather (within the parent's state bound, app/src/database/durable.py).
MAX_RESULT_BYTES = 8 * 1024 * 1024
MIN_KEY_RATE_PER_S = 1 / MAX_DELAY_S


def _date_time_text(value: Any) -> Any:
    """The schema says an RFC 3339 string: a number (which pydantic would read as a Unix time)
    is refused rather than taken for 1970."""
    if value is not None and not isinstance(value, str | datetime):
        raise ValueError("expected an RFC 3339 date-time string")
    return value


def _utc_representable(value: datetime) -> datetime:
    """A time that exists in UTC: 0001-01-01T00:00:00+14:00 and 9999-12-31T23:59:59-14:00 do not
    (years 0 and 10000), and the database driver's conversion to UTC failed on them (a 500)."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range: years 1 to 9999 in UTC") from None
    return value


Instant = Annotated[AwareDatetime, AfterValidator(_utc_representable)]
DateTimeText = Annotated[Instant, BeforeValidator(_date_time_text)]


def storable(value: Any) -> Any:
    """A value PostgreSQL can store: no NUL character in any string or key (a 422, not a 500)."""
    if json_text.contains_nul(value):
        raise ValueError(json_text.NUL_MESSAGE)
    return value


StorableJson = Annotated[Any, AfterValidator(storable)]
StorableObject = Annotated[dict[str, Any], AfterValidator(storable)]
ConcurrencyKey = Annotated[
    str,
    AfterValidator(storable),
    Field(
        min_length=1,
        max_length=128,
        description="tasks with the same key share the queue's key_concurrency and key_rate_limit_per_s",
        examples=["customer-42"],
    ),
]
MAX_DEBOUNCE_S = 7 * 86_400


class DebounceIn(BaseModel):
    """While a task with this debounce key has not started, a new enqueue replaces its payload and
    moves its run_at to now + period_s (never later than the first enqueue + max_wait_s, the first
    enqueue's own run_at included)."""

    model_config = ConfigDict(extra="forbid")

    key: ConcurrencyKey
    period_s: float = Field(ge=0, le=MAX_DEBOUNCE_S)
    max_wait_s: float | None = Field(default=None, ge=0, le=MAX_DEBOUNCE_S)


class TaskIn(BaseModel):
    """A task to enqueue. `run_at` or `delay_s` defers it; neither means now."""

    model_config = ConfigDict(extra="forbid")

    queue: QueueName = "default"
    kind: KindName
    payload: dict[str, Any] = Field(default_factory=dict)
    run_at: Instant | None = None
    delay_s: float | None = Field(default=None, ge=0, le=MAX_DELAY_S)
    priority: int = Field(default=5, ge=0, le=9, description="0 runs first, 9 last")
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    concurrency_key: ConcurrencyKey | None = None
    debounce: DebounceIn | None = None
    depends_on: list[UUID] | None = Field(
        default=None,
        max_length=100,
        description="tasks of this client that must complete first (the task is `waiting` until then; "
        "it is cancelled if one of them is discarded or cancelled)",
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> TaskIn:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        if self.debounce is not None and (self.run_at is not None or self.delay_s is not None):
            raise ValueError(
                "a debounced task runs debounce.period_s after its last enqueue: no run_at or delay_s"
            )
        return self


class TaskBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskIn] = Field(min_length=1, max_length=1000)


@record
class Task:
    """A task as storage returns it (built from rows by app/src/database/tasks.py `to_task`)."""

    id: UUID
    client_id: UUID
    queue_id: int
    queue: str
    kind: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    last_error: str | None
    progress: Any
    cancel_requested: bool = False
    schedule: dict[str, Any] | None = None  # ScheduleRef fields when a schedule made the task
    concurrency_key: str | None = None
    waiting_for: dict[str, Any] | None = None  # why a waiting task waits (None: a provider, polled)
    parent_id: UUID | None = None  # the task that spawned it (ctx.spawn)
    depends_on: list[UUID] | None = None  # tasks that must complete before it runs
    durable: bool = False  # it stored steps, signals or children: it has a composition history


class BlockedBy(BaseModel):
    """One reason a task that is not running is not running yet."""

    reason: str = Field(
        description="run_at | queue_paused | queue_concurrency | queue_rate_limit | key_concurrency | "
        "key_rate_limit | host_concurrency | host_unhealthy | dependencies | children | signal | no_worker"
    )
    detail: str


class ScheduleRef(BaseModel):
    """The schedule fire that created a task."""

    id: UUID = Field(description="the schedule")
    fire_time: datetime = Field(description="the cron fire time (or the moment of a manual trigger)")
    coalesced_fires: int = Field(
        default=0,
        description="later fire times, missed while no scheduler ran, that this one task stands for",
    )
    manual: bool = Field(default=False, description="created by POST /api/schedules/{id}/trigger")


class TaskOut(BaseModel):
    id: UUID
    queue: str
    kind: str
    payload: dict[str, Any]
    status: Status
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any = None
    last_error: str | None = None
    progress: Any = None
    schedule: ScheduleRef | None = None
    concurrency_key: str | None = None
    blocked_by: list[BlockedBy] | None = Field(
        default=None, description="GET /api/tasks/{id} of a task that is not running: why it waits"
    )
    debounced: bool | None = Field(
        default=None, description="enqueue with debounce: true when an earlier task took this enqueue"
    )
    waiting_for: dict[str, Any] | None = Field(
        default=None,
        description="why a `waiting` task waits: {type: http_status | signal | children | dependencies, ...}",
    )
    parent_id: UUID | None = Field(default=None, description="the task that spawned this one (ctx.spawn)")
    depends_on: list[UUID] | None = None

    @classmethod
    def from_domain(cls, task: Task, *, blocked_by: list[BlockedBy] | None = None) -> TaskOut:
        return cls(
            id=task.id,
            queue=task.queue,
            kind=task.kind,
            payload=task.payload,
            status=Status(task.status),
            priority=task.priority,
            attempts=task.attempts,
            max_attempts=task.max_attempts,
            run_at=task.run_at,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            result=task.result,
            last_error=task.last_error,
            progress=task.progress,
            schedule=ScheduleRef.model_validate(task.schedule) if task.schedule else None,
            concurrency_key=task.concurrency_key,
            blocked_by=blocked_by,
            waiting_for=waiting_for(task),
            parent_id=task.parent_id,
            depends_on=task.depends_on,
        )


def waiting_for(task: Task) -> dict[str, Any] | None:
    """The reason of a waiting task; a waiting task without one is polling its provider."""
    if task.status != Status.WAITING:
        return None
    return task.waiting_for if task.waiting_for is not None else {"type": "http_status"}


def task_body(task: Task, *, debounced: bool | None = None) -> dict[str, Any]:
    """TaskOut's JSON object for a task, without building the model (the enqueue hot path).

    For a batch of a thousand tasks, validating and dumping TaskOut models cost more than the
    insert; the values come from storage, already typed. A unit test holds this to
    `TaskOut.from_domain(task).model_dump(mode="json")` for every shape of task.
    """
    return {
        "id": task.id,
        "queue": task.queue,
        "kind": task.kind,
        "payload": task.payload,
        "status": task.status,
        "priority": task.priority,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "run_at": task.run_at,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "result": task.result,
        "last_error": task.last_error,
        "progress": task.progress,
        "schedule": ScheduleRef.model_validate(task.schedule).model_dump() if task.schedule else None,
        "concurrency_key": task.concurrency_key,
        "blocked_by": None,
        "debounced": debounced,
        "waiting_for": waiting_for(task),
        "parent_id": task.parent_id,
        "depends_on": task.depends_on,
    }


SignalName = KindName  # the same rule: 1 to 128 letters, digits and . _ : -, a letter or digit first


class SignalIn(BaseModel):
    """A signal for `ctx.wait_signal(name)`: kept until the task waits for it, then delivered."""

    model_config = ConfigDict(extra="forbid")

    data: StorableJson = None


class SignalOut(BaseModel):
    task_id: UUID
    name: str
    status: Status = Field(
        description="the task's status after the signal (`available` if it was waiting for it)"
    )


class StepOut(BaseModel):
    name: str
    result: Any = None
    created_at: datetime


class StepList(BaseModel):
    """One page of a task's steps, in the order they were stored; `next_cursor` (null on the last
    page) asks for the next."""

    items: list[StepOut]
    next_cursor: str | None = None


# A task holds at most 1,000 steps (app/src/database/durable.py, MAX_STEPS): by default one page
# holds them all, unless their results pass a page's bytes (app/src/api/tasks.py, STEPS_PAGE_BYTES).
class StepListQuery(ListQuery):
    """Pages of steps: up to 1,000 at a time (a task holds at most 1,000), and 4 MiB of results."""

    limit: int = Field(default=1000, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=4096)


class TaskEvent(BaseModel):
    """One server-sent event about a task."""

    id: UUID
    status: Status
    attempts: int
    progress: Any = None
    last_error: str | None = None


class TaskBatchOut(BaseModel):
    items: list[TaskOut]


class TaskList(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class ClientFilterQuery(PageQuery):
    """A page of a client's list (queues, hosts)."""

    client_id: UUID | None = Field(
        default=None, description="operator sessions only: read this client's data instead of their own"
    )


class TaskListQuery(PageQuery):
    # a filter this list does not take (created_after, as bulk actions take) was ignored, and the
    # answer listed every task as if it matched: a 422 naming it instead (ListQuery)
    client_id: UUID | None = Field(
        default=None, description="operator sessions only: list this client's tasks instead of their own"
    )
    queue: QueueName | None = None
    status: Status | None = None
    kind: KindName | None = None
    limit: int = Field(default=50, ge=1, le=500)


class BulkFilter(BaseModel):
    """Which of the caller's tasks a bulk action reaches (every field narrows it)."""

    model_config = ConfigDict(extra="forbid")

    queue: QueueName | None = None
    kind: KindName | None = None
    status: Status | None = None
    created_before: DateTimeText | None = None
    created_after: DateTimeText | None = None

    @field_validator("created_after")
    @classmethod
    def _a_range(cls, created_after: datetime | None, info: ValidationInfo) -> datetime | None:
        """Both bounds are exclusive: created_after at or past created_before matches no task, and
        was answered {"count": 0} (a caller who swapped them learnt nothing). Refused instead."""
        created_before = info.data.get("created_before")  # declared first: validated already
        if created_after is not None and created_before is not None and created_after >= created_before:
            raise ValueError(
                "created_after must be earlier than created_before (both exclusive): "
                "this range matches no task"
            )
        return created_after


class BulkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: BulkFilter


class BulkOut(BaseModel):
    count: int = Field(description="tasks retried or cancelled by this call")


class WaitQuery(BaseModel):
    wait: float | None = Field(default=None, ge=0, le=60, description="long-poll up to S seconds")


@dataclass(frozen=True, slots=True)
class Attempt:
    attempt: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    http_status: int | None
    error: str | None
    duration_ms: float
    traceback: str | None = None  # a Python failure's traceback, at most 8 KiB (its end)
    seq: int | None = None  # its row's id: where a page of attempts ends (the keyset)


class AttemptOut(BaseModel):
    attempt: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    http_status: int | None
    error: str | None
    duration_ms: float
    traceback: str | None = Field(
        default=None, description="The traceback of a Python failure, at most 8 KiB (its last part)"
    )


class AttemptList(BaseModel):
    items: list[AttemptOut]
    next_cursor: str | None = added_next_cursor()


class QueueIn(BaseModel):
    """Queue settings; omitted fields keep their current (or default) values."""

    model_config = ConfigDict(extra="forbid")

    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=1_000_000)
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    min_backoff_s: float | None = Field(default=None, ge=0, le=86_400)
    max_backoff_s: float | None = Field(default=None, ge=0, le=30 * 86_400)
    paused: bool | None = None
    key_concurrency: int | None = Field(
        default=None, ge=1, le=100_000, description="running tasks per concurrency_key, cluster-wide"
    )
    # at least one start a year: a key's rate window is 1/rate seconds, and a far smaller rate
    # (1e-300) made a window PostgreSQL cannot compute, which failed every keyed claim of the queue
    key_rate_limit_per_s: float | None = Field(
        default=None,
        ge=MIN_KEY_RATE_PER_S,
        le=1_000_000,
        description="task starts per second per concurrency_key (at least one a year)",
    )


@dataclass(frozen=True, slots=True)
class Queue:
    id: int
    client_id: UUID
    name: str
    max_concurrency: int | None
    rate_limit_per_s: float | None
    max_attempts: int
    min_backoff_s: float
    max_backoff_s: float
    paused: bool
    created_at: datetime
    updated_at: datetime
    key_concurrency: int | None = None
    key_rate_limit_per_s: float | None = None

    @property
    def keyed(self) -> bool:
        """Claimed through the keyed claim (fair across keys, per-key limits)."""
        return self.key_concurrency is not None or self.key_rate_limit_per_s is not None


class QueueOut(BaseModel):
    name: str
    max_concurrency: int | None
    rate_limit_per_s: float | None
    max_attempts: int
    min_backoff_s: float
    max_backoff_s: float
    paused: bool
    key_concurrency: int | None = None
    key_rate_limit_per_s: float | None = None
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int] | None = None
    oldest_available_age_s: float | None = None

    @classmethod
    def from_domain(
        cls, queue: Queue, *, counts: dict[str, int] | None = None, oldest_age_s: float | None = None
    ) -> QueueOut:
        return cls(
            name=queue.name,
            max_concurrency=queue.max_concurrency,
            rate_limit_per_s=queue.rate_limit_per_s,
            max_attempts=queue.max_attempts,
            min_backoff_s=queue.min_backoff_s,
            max_backoff_s=queue.max_backoff_s,
            paused=queue.paused,
            key_concurrency=queue.key_concurrency,
            key_rate_limit_per_s=queue.key_rate_limit_per_s,
            created_at=queue.created_at,
            updated_at=queue.updated_at,
            counts=counts,
            oldest_available_age_s=oldest_age_s,
        )


class QueueList(BaseModel):
    items: list[QueueOut]
    next_cursor: str | None = added_next_cursor()


class PurgeOut(BaseModel):
    purged: int


class KindOut(BaseModel):
    name: str
    aliases: list[str]
    payload_schema: dict[str, Any]
    result_schema: dict[str, Any] | None
    max_attempts: int | None
    description: str | None
    remote: bool = Field(default=False, description="a remote kind: run by this client's workers over HTTPS")


class KindList(BaseModel):
    items: list[KindOut]
    next_cursor: str | None = added_next_cursor()
