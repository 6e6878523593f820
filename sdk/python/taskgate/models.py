"""Typed answers of the Taskgate API. Unknown fields are kept (`extra="allow"`): a newer server
never breaks an older SDK."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

Status = Literal[
    "scheduled", "available", "running", "waiting", "retryable", "completed", "discarded", "cancelled"
]
TERMINAL: frozenset[str] = frozenset({"completed", "discarded", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


ItemT = TypeVar("ItemT")


class Page(_Model, Generic[ItemT]):
    """One page of a list; `next_cursor` (absent or null on the last page) asks for the next."""

    items: list[ItemT]
    next_cursor: str | None = None


class BlockedBy(_Model):
    """Why a task that is not running waits: `reason` (run_at, queue_paused, key_concurrency, ...)."""

    reason: str
    detail: str = ""


class Task(_Model):
    id: UUID
    queue: str
    kind: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    last_error: str | None = None
    progress: Any = None
    concurrency_key: str | None = None
    blocked_by: list[BlockedBy] | None = None
    debounced: bool | None = None
    waiting_for: dict[str, Any] | None = None  # why a waiting task waits: {type: signal | children | ...}
    parent_id: UUID | None = None
    depends_on: list[UUID] | None = None
    cancel_requested: bool = False  # a running task asked to stop (it ends cancelled)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class TaskPage(_Model):
    items: list[Task]
    next_cursor: str | None = None


class Attempt(_Model):
    attempt: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    http_status: int | None = None
    error: str | None = None
    duration_ms: float


class TaskEvent(_Model):
    """One server-sent event of `GET /api/tasks/{id}/events`: a status or progress change."""

    id: UUID
    status: str
    attempts: int
    progress: Any = None
    last_error: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Queue(_Model):
    name: str
    max_concurrency: int | None = None
    rate_limit_per_s: float | None = None
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


class Schedule(_Model):
    id: UUID
    name: str
    cron: str
    timezone: str
    task: dict[str, Any]
    paused: bool
    next_run_at: datetime | None = None
    last_fire_time: datetime | None = None
    last_task_id: UUID | None = None
    created_at: datetime
    updated_at: datetime


class Kind(_Model):
    name: str
    aliases: list[str] = Field(default_factory=list)
    payload_schema: dict[str, Any]
    result_schema: dict[str, Any] | None = None
    max_attempts: int | None = None
    description: str | None = None
    remote: bool = False


class ClaimedTask(_Model):
    id: UUID
    kind: str
    queue: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    lease_expires_at: datetime
    # W3C trace context the task was enqueued in: a handler may continue that trace from it
    traceparent: str | None = None
    steps: dict[str, Any] = Field(default_factory=dict)
    signals: dict[str, Any] = Field(default_factory=dict)
    children: dict[str, Any] = Field(default_factory=dict)
    # the names in `steps` that are sleeps' and signal waits' records; None from a server that
    # does not say (older than this field): then a name's sort cannot be checked
    waits: list[str] | None = None


class Claim(_Model):
    lease_s: float
    items: list[ClaimedTask]
    # not in the body: the answer's Retry-After (a server shutting down ends a claim's long-poll
    # at once and says when to claim again), set by AsyncClient.claim
    retry_after_s: float | None = None


class Lease(_Model):
    id: UUID
    lease_expires_at: datetime
    cancel_requested: bool


class Heartbeat(_Model):
    items: list[Lease]
    lost: list[UUID]


class CompletionAnswer(_Model):
    id: UUID
    accepted: bool
    status: str | None = None


class WorkerInfo(_Model):
    id: UUID
    name: str
    version: str | None = None
    remote: bool = True
    kinds: list[str]
    queues: list[str] | None = None
    running: int
    last_seen_at: datetime
