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


class FanOut(BaseModel):
    children: int


@task_kind("bench.fanout", payload=FanOut)
async def fan_out(ctx: TaskContext, payload: FanOut) -> dict[str, int]:
    """Spawns `children` noop children and gathers them (bench/fanout.py)."""
    handles = [await ctx.spawn("noop", {}, key=str(i)) for i in range(payload.children)]
    return {"gathered": len(await ctx.gather(handles))}
