"""Task kinds that only tests declare (loaded with TASK_KIND_MODULES=tests.kinds)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

from app.src.api.kinds import PermanentError, RetryLater, TaskContext, task_kind


class Record(BaseModel):
    path: str
    seconds: float = 0.0


class Flaky(BaseModel):
    fail_times: int
    retry_after_s: float | None = None
    permanent: bool = False


class Done(BaseModel):
    ok: bool = True


@task_kind("test.record", payload=Record, result=Done)
async def record(ctx: TaskContext, payload: Record) -> Done:
    """Append 'task_id attempt pid start end' to a file: proves who ran what, when, how often."""
    start = time.time()
    if payload.seconds:
        await asyncio.sleep(payload.seconds)
    line = f"{ctx.task_id} {ctx.attempt} {os.getpid()} {start:.6f} {time.time():.6f}\n"
    with Path(payload.path).open("a") as handle:
        handle.write(line)
    return Done()


@task_kind("test.flaky", payload=Flaky, result=Done)
async def flaky(ctx: TaskContext, payload: Flaky) -> Done:
    """Fails its first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= payload.fail_times:
        if payload.permanent:
            raise PermanentError(f"permanent failure on attempt {ctx.attempt}")
        if payload.retry_after_s is not None:
            raise RetryLater(f"busy on attempt {ctx.attempt}", after_s=payload.retry_after_s)
        raise RuntimeError(f"boom on attempt {ctx.attempt}")
    return Done()


class Returns(BaseModel):
    value: str
    nul: bool = False
    big: bool = False


@task_kind("test.returns", payload=Returns)
async def returns(ctx: TaskContext, payload: Returns) -> dict[str, object]:
    """A raw result (no result model): with a NUL character or an integer beyond 64 bits on request."""
    result: dict[str, object] = {"value": payload.value + ("\x00" if payload.nul else "")}
    if payload.big:
        result["big"] = 2**70 + 1
    return result


class Span(BaseModel):
    path: str
    seconds: float


@task_kind("test.span", payload=Span, result=Done)
async def span(ctx: TaskContext, payload: Span) -> Done:
    """Append 'task_id attempt pid start end' when the handler ends, however it ends (completed or
    cancelled): proves that two executions of one task never overlapped in time."""
    start = time.time()
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        line = f"{ctx.task_id} {ctx.attempt} {os.getpid()} {start:.6f} {time.time():.6f}\n"
        with Path(payload.path).open("a") as handle:
            handle.write(line)
    return Done()


class Deep(BaseModel):
    depth: int


def _descend(depth: int) -> None:
    if depth <= 0:
        raise ValueError("boom at the bottom")
    _and_again(depth - 1)  # two functions in turn: Python folds only identical repeated frames


def _and_again(depth: int) -> None:
    _descend(depth)


@task_kind("test.deep", payload=Deep, result=Done, max_attempts=1)
async def deep(ctx: TaskContext, payload: Deep) -> Done:
    """Raises `depth` frames down: a traceback longer than the 8 KiB an attempt keeps."""
    _descend(payload.depth)
    return Done()
