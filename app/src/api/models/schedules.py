"""Schedule contracts: cron schedules that enqueue a task template at each fire time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from app.src.api.models.common import PageQuery
from app.src.api.models.tasks import ConcurrencyKey, KindName, QueueName

ScheduleName = Annotated[str, Field(min_length=1, max_length=200, examples=["nightly-report"])]
CronExpression = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        examples=["30 2 * * *"],
        description="crontab: minute hour day-of-month month day-of-week (0 or 7 = Sunday), or a "
        "macro (@hourly, @daily, @weekly, @monthly, @yearly)",
    ),
]
TimeZoneName = Annotated[
    str, Field(min_length=1, max_length=64, examples=["Europe/Berlin"], description="an IANA time zone")
]


class TaskTemplate(BaseModel):
    """The task each fire enqueues."""

    model_config = ConfigDict(extra="forbid")

    queue: QueueName = "default"
    kind: KindName
    payload: dict[str, Any] = Field(default_factory=dict)
    concurrency_key: ConcurrencyKey | None = None


class ScheduleIn(BaseModel):
    """A new schedule; the cron expression is read in `timezone` (UTC unless given)."""

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName
    cron: CronExpression
    timezone: TimeZoneName = "UTC"
    task: TaskTemplate
    paused: bool = False


class SchedulePatch(BaseModel):
    """Changes to a schedule; omitted fields keep their values. `task` replaces the whole template.

    Pausing stops fires (next_run_at becomes null); resuming, or changing cron or timezone,
    computes the next fire time from now: fires skipped while paused are not made up.
    """

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName | None = None
    cron: CronExpression | None = None
    timezone: TimeZoneName | None = None
    task: TaskTemplate | None = None
    paused: bool | None = None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as storage returns it (mapped from rows with dacite)."""

    id: UUID
    client_id: UUID
    name: str
    cron: str
    timezone: str
    queue: str
    kind: str
    payload: dict[str, Any]
    paused: bool
    next_run_at: datetime | None
    last_fire_time: datetime | None
    last_task_id: UUID | None
    created_at: datetime
    updated_at: datetime
    concurrency_key: str | None = None


class ScheduleOut(BaseModel):
    id: UUID
    name: str
    cron: str
    timezone: str
    task: TaskTemplate
    paused: bool
    next_run_at: datetime | None = Field(description="the next fire time in UTC; null while paused")
    last_fire_time: datetime | None = Field(description="the latest cron fire time that made a task")
    last_task_id: UUID | None = Field(description="the task that fire made")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_domain(cls, schedule: Schedule) -> ScheduleOut:
        return cls(
            id=schedule.id,
            name=schedule.name,
            cron=schedule.cron,
            timezone=schedule.timezone,
            task=TaskTemplate(
                queue=schedule.queue,
                kind=schedule.kind,
                payload=schedule.payload,
                concurrency_key=schedule.concurrency_key,
            ),
            paused=schedule.paused,
            next_run_at=schedule.next_run_at,
            last_fire_time=schedule.last_fire_time,
            last_task_id=schedule.last_task_id,
            created_at=schedule.created_at,
            updated_at=schedule.updated_at,
        )


class ScheduleList(BaseModel):
    items: list[ScheduleOut]
    next_cursor: str | None


class ScheduleListQuery(PageQuery):
    limit: int = Field(default=50, ge=1, le=500)
