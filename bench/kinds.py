"""Kinds only the benchmarks declare."""

from __future__ import annotations

import time

from pydantic import BaseModel

from app.src.api.kinds import TaskContext, task_kind

LATENCIES: list[float] = []


class Stamp(BaseModel):
    t0: float


@task_kind("bench.stamp", payload=Stamp)
async def stamp(ctx: TaskContext, payload: Stamp) -> None:
    """Records how long ago the task was enqueued (wall clock of the same machine)."""
    LATENCIES.append(time.time() - payload.t0)
