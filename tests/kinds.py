"""Task kinds that only tests declare (loaded with TASK_KIND_MODULES=tests.kinds)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from uuid import UUID

from pydantic import BaseModel

from app.src.api.kinds import (
    Child,
    ChildFailed,
    PermanentError,
    RetryLater,
    SignalTimeout,
    TaskContext,
    task_kind,
)


class Record(BaseModel):
    path: str
    seconds: float = 0.0
    started_path: str | None = None  # a line is appended here when the handler starts


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
    if payload.started_path:
        with Path(payload.started_path).open("a") as handle:
            handle.write(f"{ctx.task_id}\n")
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


class Raises(BaseModel):
    what: str  # "inner_cancel": awaits a cancelled sub-task; "timeout": raises its own TimeoutError


@task_kind("test.raises", payload=Raises, result=Done, max_attempts=1)
async def raises(ctx: TaskContext, payload: Raises) -> Done:
    """Exceptions that look like the worker's own: a CancelledError and a TimeoutError that the
    handler's own code raised, not a cancel or a timeout of the attempt."""
    if payload.what == "inner_cancel":
        sub = asyncio.ensure_future(asyncio.sleep(10))
        sub.cancel()
        await sub
    raise TimeoutError("the handler's own call timed out")


class SlowUnwind(BaseModel):
    seconds: float
    unwind_s: float


@task_kind("test.slow_unwind", payload=SlowUnwind, result=Done)
async def slow_unwind(ctx: TaskContext, payload: SlowUnwind) -> Done:
    """Runs for `seconds`; cancelled, its cleanup takes `unwind_s` more."""
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        await asyncio.sleep(payload.unwind_s)
    return Done()


class Returns(BaseModel):
    value: str
    nul: bool = False
    big: bool = False
    pad: int = 0  # this many more characters in the result


@task_kind("test.returns", payload=Returns)
async def returns(ctx: TaskContext, payload: Returns) -> dict[str, object]:
    """A raw result (no result model): with a NUL character, an integer beyond 64 bits or `pad`
    characters more on request."""
    result: dict[str, object] = {"value": payload.value + ("\x00" if payload.nul else "") + "x" * payload.pad}
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


# --- durable composition -------------------------------------------------------------------------


def _mark(path: str, line: str) -> None:
    with Path(path).open("a") as handle:
        handle.write(line + "\n")


class Steps(BaseModel):
    path: str  # one line per execution of a step's function: counts re-runs
    hold_s: float = 0.0  # how long step three holds on after marking that it started
    gate: str | None = None  # step three fails until this file exists


@task_kind("test.steps", payload=Steps)
async def three_steps(ctx: TaskContext, payload: Steps) -> dict[str, object]:
    """Three steps whose functions each append a line: a replay that re-ran one shows twice."""

    def one() -> int:
        _mark(payload.path, f"{ctx.task_id} one")
        return 1

    async def two(previous: int) -> int:
        _mark(payload.path, f"{ctx.task_id} two")
        return previous + 1

    async def three(previous: int) -> int:
        _mark(payload.path, f"{ctx.task_id} three {os.getpid()}")
        if payload.gate and not Path(payload.gate).exists():
            raise RuntimeError("the gate is closed")
        await asyncio.sleep(payload.hold_s)
        return previous + 1

    first = await ctx.step("one", one)
    second = await ctx.step("two", two, first)
    third = await ctx.step("three", three, second)
    return {"results": [first, second, third]}


class Nap(BaseModel):
    seconds: float
    path: str | None = None


@task_kind("test.nap", payload=Nap)
async def nap(ctx: TaskContext, payload: Nap) -> dict[str, object]:
    """Sleeps durably, then says when it woke up."""
    started = await ctx.step("started", time.time)
    await ctx.sleep("nap", payload.seconds)
    woke = time.time()
    if payload.path:
        _mark(payload.path, f"{ctx.task_id} woke")
    return {"slept_s": woke - started}


class HoldThenNap(BaseModel):
    hold_s: float
    seconds: float


@task_kind("test.hold_then_nap", payload=HoldThenNap)
async def hold_then_nap(ctx: TaskContext, payload: HoldThenNap) -> dict[str, object]:
    """A step that takes a while (time to ask for a cancel while it runs), then a durable sleep."""

    async def hold() -> float:
        await asyncio.sleep(payload.hold_s)
        return time.time()

    held = await ctx.step("held", hold)
    await ctx.sleep("nap", payload.seconds)
    return {"held_at": held}


@task_kind("test.wait_shaped_step", payload=Nap)
async def wait_shaped_step(ctx: TaskContext, payload: Nap) -> dict[str, object]:
    """A step whose result has the keys a wait record has, replayed after a sleep: it must come
    back exactly as it was stored."""
    stored = await ctx.step("looks_like_a_wait", lambda: {"sleep_until": "when ready", "timed_out": "no"})
    await ctx.sleep("nap", payload.seconds)
    return {"step": stored}


@task_kind("test.step_named_like_a_sleep", payload=Nap)
async def step_named_like_a_sleep(ctx: TaskContext, payload: Nap) -> dict[str, object]:
    """A step under the name of a sleep it took before: names are unique per task."""
    await ctx.sleep("nap", payload.seconds)
    stored = await ctx.step("nap", lambda: {"answer": 42})
    await ctx.sleep("nap again", payload.seconds)  # a replay follows
    return {"step": stored}


class AwaitSignal(BaseModel):
    name: str
    timeout_s: float | None = None
    nap_s: float = 0.0  # a durable sleep after the wait: the task is still unfinished meanwhile


@task_kind("test.await_signal", payload=AwaitSignal)
async def await_signal(ctx: TaskContext, payload: AwaitSignal) -> dict[str, object]:
    """Waits for one signal; returns its data, or says that it timed out."""
    try:
        data = await ctx.wait_signal(payload.name, timeout_s=payload.timeout_s)
    except SignalTimeout:
        data = None
        timed_out = True
    else:
        timed_out = False
    if payload.nap_s:
        await ctx.sleep("nap", payload.nap_s)
    return {"timed_out": True} if timed_out else {"data": data}


class FanOut(BaseModel):
    children: int
    path: str | None = None
    fail: list[int] = []
    queue: str | None = None
    pad: int = 0  # each child's result holds this many characters more


class ChildWork(BaseModel):
    i: int
    path: str | None = None
    fail: bool = False
    pad: int = 0


@task_kind("test.child", payload=ChildWork)
async def child_work(ctx: TaskContext, payload: ChildWork) -> dict[str, object]:
    if payload.path:
        _mark(payload.path, f"{ctx.task_id} {payload.i} {os.getpid()}")
    if payload.fail:
        raise PermanentError(f"child {payload.i} fails")
    return {"value": payload.i * 2, "pad": "x" * payload.pad} if payload.pad else {"value": payload.i * 2}


@task_kind("test.fanout", payload=FanOut)
async def fan_out(ctx: TaskContext, payload: FanOut) -> dict[str, object]:
    """Spawns `children` children, gathers them, and sums their results."""
    handles = [
        await ctx.spawn(
            "test.child",
            {"i": i, "path": payload.path, "fail": i in payload.fail, "pad": payload.pad},
            key=f"c{i}",
            queue=payload.queue,
        )
        for i in range(payload.children)
    ]
    try:
        results = await ctx.gather(handles)
    except ChildFailed as exc:
        return {"child_failed": exc.key, "status": exc.status}
    return {"sum": sum(r["value"] for r in results), "count": len(results)}


class SpawnThenEnd(BaseModel):
    queue: str  # where the children go (a paused queue keeps them unfinished)
    hold_s: float = 0.0  # how long the run after the spawn holds on (time to ask for a cancel)
    end: str = "fail"  # fail (for good) or complete, without gathering


@task_kind("test.spawn_then_end", payload=SpawnThenEnd)
async def spawn_then_end(ctx: TaskContext, payload: SpawnThenEnd) -> dict[str, object]:
    """Spawns two children, suspends (so they exist), then ends without gathering them."""
    for i in range(2):
        await ctx.spawn("test.child", {"i": i}, key=f"c{i}", queue=payload.queue)
    await ctx.sleep("spawned", 0)

    async def hold() -> float:
        await asyncio.sleep(payload.hold_s)
        return time.time()

    await ctx.step("held", hold)
    if payload.end == "fail":
        raise PermanentError("the parent fails for good")
    return {"ended": payload.end}


class GatherStranger(BaseModel):
    stranger: str  # a task id (another task's child) or "" (a handle made by hand)


@task_kind("test.gather_stranger", payload=GatherStranger)
async def gather_stranger(ctx: TaskContext, payload: GatherStranger) -> dict[str, object]:
    """Gathers a handle that is not a child of this task."""
    mine = await ctx.spawn("noop", {}, key="mine")
    if payload.stranger:
        [result] = await ctx.gather([mine])  # "mine" now exists: pass another task's id under its key
        await ctx.gather([Child("mine", UUID(payload.stranger))])
        return {"result": result}
    await ctx.gather([mine, Child("nobody")])
    return {}


class Limits(BaseModel):
    big_step: bool = False  # a step result over 1 MiB
    children: int = 0  # spawn this many children (10,001 is one too many)
    steps: int = 0  # store this many steps (1,001 is one too many)
    step_bytes: int = 0  # each of those steps returns a string of this many characters


@task_kind("test.limits", payload=Limits)
async def limits(ctx: TaskContext, payload: Limits) -> dict[str, object]:
    """Goes past a composition limit on request."""
    if payload.big_step:
        await ctx.step("big", lambda: "x" * (1024 * 1024 + 1))
    for i in range(payload.steps):
        await ctx.step(f"s{i}", lambda i=i: "x" * payload.step_bytes if payload.step_bytes else i)
    handles = [await ctx.spawn("noop", {}, key=str(i)) for i in range(payload.children)]
    await ctx.gather(handles)
    return {}


class SpawnInStep(BaseModel):
    path: str  # the child marks each of its runs here
    failed_once: str  # the step after the spawn fails the first time it runs (this file marks it)
    gather: bool = True  # gather the child, or leave it to run (fire and forget)


@task_kind("test.spawn_in_step", payload=SpawnInStep)
async def spawn_in_step(ctx: TaskContext, payload: SpawnInStep) -> dict[str, object]:
    """Spawns a child inside a step, then a later step fails once: the retry replays the first step
    from storage (its function, and the spawn in it, do not run again)."""

    async def order() -> str:
        child = await ctx.spawn("test.child", {"i": 7, "path": payload.path}, key="email")
        return child.key

    def charge() -> bool:
        if not Path(payload.failed_once).exists():
            Path(payload.failed_once).touch()
            raise RuntimeError("the payment service is down")
        return True

    key = await ctx.step("order", order)
    await ctx.step("charge", charge)
    if not payload.gather:
        return {"charged": True}
    [result] = await ctx.gather([Child(key)])
    return {"child": result}


class WaitNamedLikeAStep(BaseModel):
    wait: str  # "sleep" or "signal": taken under the name of the step before it


@task_kind("test.wait_named_like_a_step", payload=WaitNamedLikeAStep)
async def wait_named_like_a_step(ctx: TaskContext, payload: WaitNamedLikeAStep) -> dict[str, object]:
    """A step whose result holds the keys a wait's record has, then a wait under the step's name."""
    await ctx.step("review", lambda: {"done": True, "timed_out": True})
    if payload.wait == "sleep":
        await ctx.sleep("review", 3600)
        return {"slept": True}
    try:
        data = await ctx.wait_signal("review", timeout_s=3600)
    except SignalTimeout:
        return {"timed_out": True}
    return {"data": data}
