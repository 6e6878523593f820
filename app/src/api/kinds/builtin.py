"""Built-in kinds for tests, benchmarks and health checks: `noop` and `sleep`."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from app.src.api.kinds import TaskCancelled, TaskContext, task_kind


class NoopPayload(BaseModel):
    model_config = ConfigDict(extra="allow")


class NoopResult(BaseModel):
    ok: bool = True


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=3600)


class SleepResult(BaseModel):
    slept_s: float


@task_kind("noop", payload=NoopPayload, result=NoopResult)
async def noop(ctx: TaskContext, payload: NoopPayload) -> NoopResult:
    """Does nothing and succeeds: the cost of the engine itself."""
    return NoopResult()


@task_kind("sleep", payload=SleepPayload, result=SleepResult)
async def sleep(ctx: TaskContext, payload: SleepPayload) -> SleepResult:
    """Sleeps for `seconds`, reporting progress each second; stops early when cancelled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    remaining = payload.seconds
    while remaining > 0:
        step = min(1.0, remaining)
        try:
            await asyncio.wait_for(ctx.cancelled.wait(), timeout=step)
        except TimeoutError:
            remaining -= step
            if remaining > 0:
                await ctx.report_progress({"slept_s": round(payload.seconds - remaining, 3)})
            continue
        raise TaskCancelled(f"cancelled after {loop.time() - started:.1f} s")
    return SleepResult(slept_s=payload.seconds)
