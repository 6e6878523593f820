"""Contracts of remote kinds and remote workers: /api/catalog/kinds/{name} and /api/workers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.src.api.models.common import PageQuery, added_next_cursor
from app.src.api.models.tasks import MAX_DELAY_S, KindName, QueueName, StorableJson, StorableObject, storable

MAX_CLAIM = 100
MAX_WAIT_S = 30.0
MAX_BATCH = 1000
# What one complete request may carry in suspensions, over all its items: one task's whole allowance
# (app/src/database/durable.py: MAX_CHILDREN children, MAX_STEPS steps in its life), and the SDK's
# largest batch (1,000 completions, each suspension carrying at most one new step). Each item alone
# allowed 10,000 children and 1,000 steps, so one request could ask for 10 million children.
MAX_SPAWN_PER_REQUEST = 10_000
MAX_STEPS_PER_REQUEST = 1000


class RemoteKindIn(BaseModel):
    """A remote kind: its payload (and result) contract as JSON Schema 2020-12."""

    model_config = ConfigDict(extra="forbid")

    payload_schema: dict[str, Any]
    result_schema: dict[str, Any] | None = None
    description: str | None = Field(default=None, max_length=2000)
    max_attempts: int | None = Field(default=None, ge=1, le=1000)


class WorkerIdentity(BaseModel):
    """Who is asking: a worker's name (unique per process, e.g. host:pid) and its code version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e][\x20-\x7e]*$")
    # checked here, not by PostgreSQL: a heartbeat writes its worker row after renewing the leases
    version: Annotated[str, AfterValidator(storable)] | None = Field(default=None, max_length=100)


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kinds: list[KindName] = Field(min_length=1, max_length=100)
    queues: list[QueueName] | None = Field(default=None, max_length=100)
    max: int = Field(default=10, ge=1, le=MAX_CLAIM)
    wait_s: float = Field(default=10, ge=0, le=MAX_WAIT_S)
    worker: WorkerIdentity


class ClaimedOut(BaseModel):
    id: UUID
    kind: str
    queue: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    lease_expires_at: datetime
    traceparent: str | None = Field(
        default=None, description="W3C trace context the task was enqueued in: continue the trace from it"
    )
    steps: dict[str, Any] = Field(default_factory=dict)
    signals: dict[str, Any] = Field(default_factory=dict)
    children: dict[str, Any] = Field(default_factory=dict)
    waits: list[str] = Field(
        default_factory=list,
        description="the names in `steps` that are sleeps' and signal waits' records, not steps' results",
    )


class ClaimOut(BaseModel):
    lease_s: float
    items: list[ClaimedOut]


class HeartbeatIn(BaseModel):
    """Renew the leases of held tasks (and report their progress)."""

    model_config = ConfigDict(extra="forbid")

    task_ids: list[UUID] = Field(max_length=MAX_BATCH)
    progress: dict[UUID, StorableObject] | None = None
    worker: WorkerIdentity | None = Field(
        default=None, description="the worker that claimed the tasks (as in the claim); guards the leases"
    )


class LeaseOut(BaseModel):
    id: UUID
    lease_expires_at: datetime
    cancel_requested: bool


class HeartbeatOut(BaseModel):
    items: list[LeaseOut]
    lost: list[UUID]


Outcome = Literal["completed", "failed", "permanent_failure", "cancelled", "suspended"]


class SpawnIn(BaseModel):
    """A child to create once per (task, key) (`ctx.spawn`)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    kind: KindName
    payload: StorableObject = Field(default_factory=dict)
    queue: QueueName | None = Field(default=None, description="default: the parent's queue")
    priority: int | None = Field(default=None, ge=0, le=9)
    max_attempts: int | None = Field(default=None, ge=1, le=1000)


class WaitIn(BaseModel):
    """What a suspended task waits for: a durable sleep, a signal, or its children."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["sleep", "signal", "children"]
    name: str | None = Field(default=None, min_length=1, max_length=200, description="sleep and signal")
    seconds: Annotated[float, Field(ge=0, le=MAX_DELAY_S)] | None = Field(
        default=None, description="a sleep's length, or a signal wait's timeout (none: no timeout)"
    )

    @model_validator(mode="after")
    def _complete(self) -> WaitIn:
        if self.type in ("sleep", "signal") and not self.name:
            raise ValueError(f"a {self.type} needs a name")
        if self.type == "sleep" and self.seconds is None:
            raise ValueError("a sleep needs seconds")
        return self


class SuspendIn(BaseModel):
    """What a `suspended` attempt produced (steps, children to create) and what it waits for
    (no `wait`: the task runs again at once, replaying what it stored)."""

    model_config = ConfigDict(extra="forbid")

    steps: dict[str, StorableJson] = Field(default_factory=dict, max_length=1000)
    spawn: list[SpawnIn] = Field(default_factory=list, max_length=10_000)
    wait: WaitIn | None = None


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: UUID
    attempt: int = Field(ge=1)
    outcome: Outcome
    result: Any = None
    error: str | None = Field(default=None, max_length=20_000)
    traceback: str | None = Field(default=None, max_length=64_000)
    retry_after_s: Annotated[float, Field(ge=0, le=366 * 86_400)] | None = None
    suspend: SuspendIn | None = Field(default=None, description="with outcome `suspended`")


class CompleteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[CompletionIn] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description=f"at most {MAX_SPAWN_PER_REQUEST} spawned children and {MAX_STEPS_PER_REQUEST} "
        "steps in all the items' suspensions together",
    )
    worker: WorkerIdentity | None = Field(
        default=None, description="the worker that claimed the tasks (as in the claim); guards the leases"
    )

    @field_validator("items")
    @classmethod
    def _bounded_work(cls, items: list[CompletionIn]) -> list[CompletionIn]:
        suspensions = [item.suspend for item in items if item.suspend is not None]
        spawned = sum(len(s.spawn) for s in suspensions)
        steps = sum(len(s.steps) for s in suspensions)
        if spawned > MAX_SPAWN_PER_REQUEST or steps > MAX_STEPS_PER_REQUEST:
            raise ValueError(
                f"one request carries at most {MAX_SPAWN_PER_REQUEST} spawned children and "
                f"{MAX_STEPS_PER_REQUEST} steps over all its items (these carry {spawned} and {steps}): "
                "send the completions in smaller batches"
            )
        return items


class CompletionOut(BaseModel):
    id: UUID
    accepted: bool
    status: str | None = Field(description="the task's status after this answer (null: no such task)")


class CompleteOut(BaseModel):
    items: list[CompletionOut]


class WorkerOut(BaseModel):
    id: UUID
    name: str
    version: str | None
    remote: bool
    kinds: list[str]
    queues: list[str] | None
    running: int
    last_seen_at: datetime


class WorkerList(BaseModel):
    items: list[WorkerOut]
    next_cursor: str | None = added_next_cursor()


class WorkerListQuery(PageQuery):
    # before pages the list was the first 1,000 (unpaged): a client that sends no `limit` (an SDK
    # from then, which reads {items} only) still gets up to as many in one answer
    limit: int = Field(default=1000, ge=1, le=1000, description="items per page")
