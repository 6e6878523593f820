"""`Worker`: runs this project's task kinds in this process, fed by Taskgate over HTTPS.

```python
worker = Worker(tg, queues=["reports"], concurrency=20)

@worker.kind("reports.build", payload=BuildReport, result=ReportReady)
async def build(ctx: TaskContext, payload: BuildReport) -> ReportReady: ...

worker.run()
```

`run()` registers each kind's schemas (PUT /api/catalog/kinds/{name}), then claims in batches
with a long-poll, runs handlers concurrently (sync handlers in a thread pool), renews leases every
third of the lease, sends progress with the heartbeats and completes in batches. A handler whose
lease is lost (or cannot be confirmed in time) is abandoned: its task belongs to another attempt
now. An async handler is cancelled; a sync handler cannot be interrupted, so it should poll
`ctx.cancelled` (or block in `ctx.wait_cancelled`) and return: until it does, it keeps its slot
and this worker does not start the same task again. SIGTERM/SIGINT: stop claiming, let running
handlers finish within `grace_s`, then cancel the rest: a handler that stops hands its task back
(available again at once, no attempt spent); one still running (a sync handler that does not
return) keeps its task until its lease expires, and the server retries it as a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ValidationError

from taskgate._core import dump, model_json
from taskgate.client import AsyncClient, Client
from taskgate.errors import ApiError, ChildFailed, PermanentError, RetryLater, SignalTimeout, TaskCancelled
from taskgate.models import ClaimedTask, CompletionAnswer, Heartbeat

log = logging.getLogger("taskgate.worker")

P = TypeVar("P")
Handler = Callable[..., Any]
MAX_CLAIM = 100
MAX_COMPLETE_BATCH = 1000
MAX_HEARTBEAT = 1000  # task ids per heartbeat (the server's limit)
FENCE_EVERY_S = 0.5  # half the smallest margin (_margin_s): a fence is never later than that
UNWIND_S = 0.25  # at shutdown, what a cancelled handler gets to end before it counts as running
# A completion that cannot be delivered (a server error, a network failure) is retried, and its
# lease kept by the heartbeats, this long at most; then it is dropped: its lease expires and
# Taskgate retries the task, rather than the task staying `running` (and its slot taken) for ever.
DELIVER_FOR_S = 300.0
MAX_TRACEBACK = 8192
MAX_NAME = 200  # a step's or wait's name as the server stores it (shown in errors)
# what the server stores of a suspension (app/src/api/engine/durable.py): a step, sleep, wait or
# child it cannot store fails the task for good there, and so it does here, before it is sent (sent,
# some are refused with the whole request, and the attempt would fail and be retried, re-running
# the step each time, for an error that can only recur)
MAX_STEP_RESULT_BYTES = 1024 * 1024
MAX_DELAY_S = 366 * 86_400
NUL_MESSAGE = "text must not contain the NUL character (\\u0000): PostgreSQL cannot store it"
_SIGNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# what the server takes (app/src/api/models/workers.py and its 8 MiB body cap); the worker keeps
# within it itself: a completion the server refuses must never stall the others
MAX_ERROR = 20_000
MAX_STORED_TRACEBACK = 64_000
MAX_COMPLETE_BYTES = 8 * 1024 * 1024 - 64 * 1024  # room for the request's envelope
# what the server takes in one complete request over all its items' suspensions
MAX_COMPLETE_SPAWNS = 10_000
MAX_COMPLETE_STEPS = 1000
REFUSED = frozenset({400, 413, 422})
# The statuses a completion leaves its task in once written, by outcome. The server answers a
# completion it already wrote `accepted: false` with the task's status: so does a request sent again
# after its first send was cut off (a 503 past the server's 10 s deadline, a lost answer) for the
# items that first send wrote. Their status is the one they asked for; a lost lease's is not
# (`running` under another worker, or `retryable` where the completion was not a failure).
_WRITTEN_AS: dict[str, frozenset[str]] = {
    "completed": frozenset({"completed"}),
    "failed": frozenset({"retryable", "discarded"}),  # discarded: at the last attempt
    "permanent_failure": frozenset({"discarded"}),
    "cancelled": frozenset({"cancelled"}),
    "suspended": frozenset({"scheduled", "available", "waiting"}),
}


_CANCEL_EVENTS = threading.Lock()  # guards the lazy creation of TaskContext's cancel event

_FINISHED = ("completed", "discarded", "cancelled")


class _Suspend(BaseException):
    """Ends a handler's attempt with a suspension (a BaseException: `except Exception` keeps out)."""

    def __init__(self, suspend: dict[str, Any]) -> None:
        super().__init__("suspended")
        self.suspend = suspend


@dataclass(frozen=True)
class Child:
    """A spawned child: its key, and its id once it exists (after the suspension that made it)."""

    key: str
    id: str | None = None


class TaskContext:
    """What a running handler knows about its task, and how it reports back.

    Durable composition (async handlers): `await ctx.step(name, fn, *args)`, `await ctx.sleep(name,
    seconds)`, `await ctx.wait_signal(name, timeout_s=...)`, `await ctx.spawn(kind, payload,
    key=...)` and `await ctx.gather(children)`. A handler that reaches a new step, a sleep, a wait
    or a gather ends its attempt `suspended`; Taskgate stores what it produced and runs it again
    from the top when it may go on, with completed steps returning their stored results. Code
    between steps must therefore be deterministic (or inside a step).
    """

    def __init__(self, task: ClaimedTask, worker: Worker) -> None:
        self.task_id: UUID = task.id
        self.attempt = task.attempt
        self.max_attempts = task.max_attempts
        self.kind = task.kind
        self.queue = task.queue
        self.payload: dict[str, Any] = task.payload
        self._worker = worker
        self._cancelled = False
        # made only for a handler that waits on it (a thread per task would pay for it otherwise)
        self._cancel_event: threading.Event | None = None
        self._steps: dict[str, Any] = dict(task.steps)
        self._signals: dict[str, Any] = dict(task.signals)
        self._children: dict[str, Any] = dict(task.children)
        self._waits: frozenset[str] | None = None if task.waits is None else frozenset(task.waits)
        self._spawns: list[dict[str, Any]] = []
        self._spawn_keys: set[str] = set()

    # --- durable composition ---------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` at most once per task to success; later runs get its stored result.

        A new step's result is sent to Taskgate (the attempt ends `suspended`) before anything
        after it runs, so a worker killed right after a step never runs it again.
        """
        if self._waits is not None and name in self._waits:  # its record is not this step's result
            raise PermanentError(
                f"the step {name[:MAX_NAME]!r} has the name of a sleep or signal wait of this task: "
                "each needs a name of its own"
            )
        if name in self._steps:
            return self._steps[name]
        _check_name("step name", name)  # before `fn` runs: a step under it could never be stored
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, BaseModel):
            value = model_json(value)
        _check_step_result(name, value)
        raise _Suspend({"steps": {name: value}, "spawn": self._take_spawns()})

    async def sleep(self, name: str, seconds: float) -> None:
        """Durable sleep: the task is `scheduled` until then and holds no worker slot."""
        self._own_wait("sleep", name)
        _check_name("sleep's name", name)
        _check_wait("sleep", name, seconds)
        stored = self._steps.get(name)
        if isinstance(stored, dict) and stored.get("done"):
            return
        wait = {"type": "sleep", "name": name, "seconds": max(0.0, float(seconds))}
        raise _Suspend({"spawn": self._take_spawns(), "wait": wait})

    async def wait_signal(self, name: str, *, timeout_s: float | None = None) -> Any:
        """The data of signal `name`; the task is `waiting` until it arrives (a signal sent
        earlier is kept). Raises SignalTimeout once `timeout_s` passed without it."""
        self._own_wait("signal wait", name)
        if not isinstance(name, str) or not _SIGNAL_NAME.fullmatch(name):  # nothing could signal it
            raise PermanentError(
                f"the signal wait {str(name)[:MAX_NAME]!r} can never be signalled: a signal name is 1 to "
                "128 letters, digits and . _ : - (starting with a letter or digit)"
            )
        if timeout_s is not None:
            _check_wait("signal wait's timeout", name, timeout_s)
        if name in self._signals:
            return self._signals[name]
        stored = self._steps.get(name)
        if isinstance(stored, dict) and stored.get("timed_out"):
            raise SignalTimeout(name)
        wait: dict[str, Any] = {"type": "signal", "name": name}
        if timeout_s is not None:
            wait["seconds"] = max(0.0, float(timeout_s))
        raise _Suspend({"spawn": self._take_spawns(), "wait": wait})

    def _own_wait(self, what: str, name: str) -> None:
        """A wait under a stored step's name would take the step's result for its record (a
        result holding `done` or `timed_out` would end it at once): it fails the task, as the
        server refuses it. Unknown (an older server's claim does not say), it is not checked."""
        if self._waits is not None and name in self._steps and name not in self._waits:
            raise PermanentError(
                f"the {what} {name[:MAX_NAME]!r} has the name of another step, sleep or signal wait "
                "of this task: each needs a name of its own"
            )

    async def spawn(
        self,
        kind: str,
        payload: BaseModel | dict[str, Any],
        *,
        key: str,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
    ) -> Child:
        """A child task, created once per (this task, key) when this attempt next suspends."""
        _check_name("child's key", key)
        known = self._children.get(key)
        if known is not None:
            return Child(key, str(known["id"]))
        if key in self._spawn_keys:
            raise ValueError(f"a child with key {key!r} was spawned twice")
        self._spawn_keys.add(key)
        spec: dict[str, Any] = {
            "key": key,
            "kind": kind,
            "payload": model_json(payload) if isinstance(payload, BaseModel) else dict(payload),
            "queue": queue or self.queue,
        }
        if priority is not None:
            spec["priority"] = priority
        if max_attempts is not None:
            spec["max_attempts"] = max_attempts
        self._spawns.append(spec)
        return Child(key)

    async def gather(self, children: list[Child]) -> list[Any]:
        """The children's results in order, once every child is terminal (the task is `waiting`
        meanwhile); a discarded or cancelled child raises ChildFailed."""
        known = self._children
        for child in children:
            # a handle that is not this task's child (made by hand, or another task's) would have
            # the task wait for a child that never counts, and resume at once, over and over
            stored = known.get(child.key)
            if stored is None and child.key not in self._spawn_keys:
                raise PermanentError(f"ctx.gather: {child.key!r} is not a child this task spawned")
            if stored is not None and child.id is not None and str(child.id) != str(stored.get("id")):
                raise PermanentError(f"ctx.gather: task {child.id} is not this task's child {child.key!r}")
        if any(c.key not in known or known[c.key].get("status") not in _FINISHED for c in children):
            raise _Suspend({"spawn": self._take_spawns(), "wait": {"type": "children"}})
        results = []
        for child in children:
            state = known[child.key]
            if state.get("status") != "completed":
                raise ChildFailed(
                    child.key, str(state.get("id")), str(state.get("status")), state.get("error")
                )
            results.append(state.get("result"))
        return results

    def _take_spawns(self) -> list[dict[str, Any]]:
        spawns, self._spawns = self._spawns, []
        return spawns

    @property
    def cancelled(self) -> bool:
        """True once a client asked to cancel this task (seen at the next heartbeat) or its lease
        was lost: a sync handler should check it and return (it cannot be interrupted)."""
        return self._cancelled

    def wait_cancelled(self, timeout_s: float | None = None) -> bool:
        """For sync handlers: block until cancelled or `timeout_s` passes."""
        with _CANCEL_EVENTS:
            if self._cancel_event is None:
                self._cancel_event = threading.Event()
                if self._cancelled:
                    self._cancel_event.set()
            event = self._cancel_event
        return event.wait(timeout_s)

    def _cancel(self) -> None:
        with _CANCEL_EVENTS:
            self._cancelled = True
            if self._cancel_event is not None:
                self._cancel_event.set()

    def progress(self, progress: dict[str, Any]) -> None:
        """Report progress (any JSON object); sent with the next heartbeat. Safe from threads.

        Datetimes and pydantic models are converted as in payloads; anything else JSON cannot
        encode raises TypeError or ValueError here, not in the heartbeat."""
        if not isinstance(progress, dict):
            raise TypeError(f"progress must be a dict, not {type(progress).__name__}")
        value = dump(progress)  # a copy: later changes to `progress` are not sent
        json.dumps(value, allow_nan=False)
        self._worker._progress[self.task_id] = value

    async def report_progress(self, progress: dict[str, Any]) -> None:
        self.progress(progress)


class HandlerThreads(Executor):
    """The threads sync handlers run in: up to `size`, started as needed and reused. Unlike a
    ThreadPoolExecutor's they are daemon threads, which the interpreter does not wait for at exit:
    a handler that never returns is left behind when the worker stops (its task to its lease, as
    documented), instead of keeping the stopped worker's process alive until it returns."""

    def __init__(self, size: int, *, name: str) -> None:
        self._size = max(1, size)
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a handler after the worker stopped")
            self._work.put((future, call, () if kwargs else args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()


@dataclass
class RegisteredKind(Generic[P]):
    name: str
    handler: Handler
    payload: type[BaseModel] | None
    result: type[BaseModel] | None
    description: str | None
    max_attempts: int | None
    is_async: bool

    def payload_schema(self) -> dict[str, Any]:
        return self.payload.model_json_schema() if self.payload is not None else {"type": "object"}

    def result_schema(self) -> dict[str, Any] | None:
        return self.result.model_json_schema() if self.result is not None else None


@dataclass
class _Running:
    task: ClaimedTask
    ctx: TaskContext
    lease_from: float  # monotonic time the request that last set its lease was sent
    runner: asyncio.Task[None] | None = None
    thread: asyncio.Future[Any] | None = None  # a sync handler's run in the pool
    previous: _Running | None = None  # a run of the same task this one waits for
    abandoned: str | None = None
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs the declared kinds. `client` is an AsyncClient, or a Client that the worker copies into
    one (`AsyncClient.like`: same address, key, headers, TLS, timeout and retries)."""

    def __init__(
        self,
        client: Client | AsyncClient,
        *,
        queues: list[str] | None = None,
        concurrency: int = 10,
        batch_size: int | None = None,
        name: str | None = None,
        version: str | None = None,
        grace_s: float = 30.0,
        wait_s: float = 10.0,
        threads: int | None = None,
    ) -> None:
        self._client_arg = client
        self.queues = queues
        self.concurrency = concurrency
        self.batch_size = min(MAX_CLAIM, batch_size or concurrency)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.version = version
        self.grace_s = grace_s
        self.wait_s = wait_s
        self.threads = threads or concurrency
        self.kinds: dict[str, RegisteredKind[Any]] = {}
        # kinds the server no longer has (deleted by their client while this worker ran): no
        # longer claimed, so the others are still served
        self._deleted: set[str] = set()
        self._progress: dict[UUID, dict[str, Any]] = {}
        self._running: dict[UUID, _Running] = {}  # the latest run of each task here
        self._busy = 0  # runs not ended: abandoned sync handlers hold their slot until they return
        self._pending: list[dict[str, Any]] = []
        # (task id, attempt) -> monotonic time that run's completion was queued
        self._pending_since: dict[tuple[str, int], float] = {}
        self._lease_s = 30.0
        self._claiming = 0  # slots reserved by claims in flight
        self._stop: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._to_complete: asyncio.Event | None = None
        self._pool: HandlerThreads | None = None
        self._client: AsyncClient | None = None

    @property
    def identity(self) -> dict[str, Any]:
        who: dict[str, Any] = {"name": self.name}
        if self.version:
            who["version"] = self.version
        return who

    def kind(
        self,
        name: str,
        *,
        payload: type[BaseModel] | None = None,
        result: type[BaseModel] | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
    ) -> Callable[[Handler], Handler]:
        """Declare a remote kind handled here: `handler(ctx, payload)`, async or not."""

        def register(handler: Handler) -> Handler:
            if name in self.kinds:
                raise ValueError(f"kind {name!r} is declared twice in this worker")
            self.kinds[name] = RegisteredKind(
                name=name,
                handler=handler,
                payload=payload,
                result=result,
                description=description or inspect.getdoc(handler),
                max_attempts=max_attempts,
                is_async=inspect.iscoroutinefunction(handler),
            )
            return handler

        return register

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (blocking)."""
        asyncio.run(self._main_with_signals())

    async def _main_with_signals(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self.run_async(stop)

    def stop(self) -> None:
        """Ask a running worker to stop gracefully (from its event loop)."""
        if self._stop is not None:
            self._stop.set()

    async def run_async(self, stop: asyncio.Event | None = None) -> None:
        if not self.kinds:
            raise RuntimeError("this worker declares no kinds (use @worker.kind(...))")
        self._stop = stop or asyncio.Event()
        self._room = asyncio.Event()
        self._to_complete = asyncio.Event()
        own_client = not isinstance(self._client_arg, AsyncClient)
        client = (
            AsyncClient.like(self._client_arg) if isinstance(self._client_arg, Client) else self._client_arg
        )
        self._client = client
        self._pool = HandlerThreads(self.threads, name="taskgate-handler")
        stopping = asyncio.create_task(self._stop.wait())
        registering = asyncio.create_task(self.register())
        try:
            # a stop asked while the kinds are registered (a server slow to answer, retried for
            # minutes) ends it there: nothing was claimed yet, so nothing is handed back
            await asyncio.wait([registering, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not registering.done():
                log.info("stopped before its kinds were registered", extra={"worker": self.name})
                return
            registering.result()
            log.info("worker started", extra={"worker": self.name, "kinds": sorted(self.kinds)})
            # several claims in flight when the capacity spans several batches: a claim's round
            # trip, not the handlers, bounds a fast worker
            claimers = max(1, min(4, self.concurrency // self.batch_size))
            claiming = [
                asyncio.create_task(self._claim_loop(), name=f"taskgate-claim-{i}") for i in range(claimers)
            ]
            services = [
                asyncio.create_task(self._heartbeat_loop(), name="taskgate-heartbeat"),
                asyncio.create_task(self._fence_loop(), name="taskgate-fence"),
                asyncio.create_task(self._complete_loop(), name="taskgate-complete"),
            ]
            await asyncio.wait([*claiming, stopping], return_when=asyncio.FIRST_COMPLETED)
            for claimer in claiming:
                claimer.cancel()
            ended = await asyncio.gather(*claiming, return_exceptions=True)
            failed = [e for e in ended if isinstance(e, Exception)]
            await self._drain(services)
            if failed:
                raise failed[0]
        finally:
            for task in (registering, stopping):
                task.cancel()
            await asyncio.gather(registering, stopping, return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)
            if own_client:
                await client.aclose()
            log.info("worker stopped", extra={"worker": self.name})

    async def register(self) -> None:
        """Register (or update) every declared kind's schemas with the server."""
        assert self._client is not None
        for kind in self.kinds.values():
            await self._client.register_kind(
                kind.name,
                payload_schema=kind.payload_schema(),
                result_schema=kind.result_schema(),
                description=kind.description,
                max_attempts=kind.max_attempts,
            )

    async def _drain(self, services: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        runners = [r.runner for r in self._running.values() if r.runner is not None]
        if runners:
            log.info("waiting for running tasks", extra={"count": len(runners), "grace_s": self.grace_s})
            await asyncio.wait(runners, timeout=max(0.0, deadline - loop.time()))
        leftover = list(self._running.values())
        for running in leftover:
            self._abandon(running, "shutdown")  # async handlers are cancelled, sync ones told
        unwinding = [r.runner for r in leftover if r.runner is not None]
        if unwinding:
            await asyncio.wait(unwinding, timeout=UNWIND_S)
        # A handler that has stopped hands its task back with an empty suspension: the attempt
        # ends without spending the failure budget and the task is available at once. Left to its
        # lease, the rescuer would count a failed attempt (and discard a task on its last one).
        # A handler still running cannot be handed back: another worker would run its task while
        # it still does; its lease, no longer renewed, expires and the task is retried.
        stuck = []
        for running in leftover:
            if running.abandoned == "shutdown" and _stopped(running):
                task = running.task
                self._queue_completion({"id": str(task.id), "attempt": task.attempt, "outcome": "suspended"})
            else:
                stuck.append(running)
            if running.runner is not None:
                running.runner.cancel()  # a sync handler's thread goes on, but the worker stops
        if stuck:
            log.warning("%d handlers still run; their tasks are left to their leases", len(stuck))
        # the last completions, within what is left of the grace period (at least a moment)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_all(), timeout=max(1.0, deadline - loop.time()))
        for service in services:
            service.cancel()
        await asyncio.gather(*services, return_exceptions=True)

    # --- claiming --------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self._client is not None
        assert self._room is not None
        failures = 0
        while True:
            free = self.concurrency - self._busy - len(self._pending) - self._claiming
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            sent = time.monotonic()
            want = min(free, self.batch_size)
            self._claiming += want
            claim = None
            kinds = sorted(set(self.kinds) - self._deleted)
            try:
                claim = await self._client.claim(
                    kinds, worker=self.identity, queues=self.queues, max=want, wait_s=self.wait_s
                )
                self._lease_s = float(claim.lease_s)
                starts = await self._confirm(claim.items, sent)  # within the slots this claim reserved
            except asyncio.CancelledError:
                # stopping with tasks claimed and not started: hand them back (the drain sends it),
                # rather than leave each to its lease and a lost attempt
                for task in claim.items if claim is not None else []:
                    self._queue_completion(
                        {"id": str(task.id), "attempt": task.attempt, "outcome": "suspended"}
                    )
                raise
            except ApiError as exc:
                deleted = _deleted_kinds(exc, kinds)
                if deleted and len(deleted) < len(kinds):
                    log.error("kinds deleted on the server are no longer claimed: %s", ", ".join(deleted))
                    self._deleted.update(deleted)
                    continue
                if exc.status in (401, 403, 422):
                    log.error("claim refused: %s", exc)
                    raise
                failures += 1
                log.warning("claim failed: %s", exc)
                claim = None
            except Exception as exc:
                failures += 1
                log.warning("claim failed: %s", exc)
                claim = None
            finally:
                self._claiming -= want
            if claim is None:
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                continue
            failures = 0
            for task, lease_from in starts:
                self._start(task, lease_from)
            if claim.retry_after_s:  # a server shutting down: another replica answers after this
                await asyncio.sleep(claim.retry_after_s)

    async def _confirm(self, tasks: list[ClaimedTask], sent: float) -> list[tuple[ClaimedTask, float]]:
        """The claimed tasks to start, each with the time its lease was set at the latest (`_Running.
        lease_from`). A claim answered late in its long-poll set its leases long after it was sent:
        reckoned from then, they could already be past the fence, and would be abandoned at once.
        Those are renewed first (one heartbeat); a task the server says is lost is not started."""
        if not tasks or time.monotonic() - sent <= self._margin_s():
            return [(task, sent) for task in tasks]
        renewing = time.monotonic()
        answer = await self._renew([task.id for task in tasks], {})
        if answer is None:  # unconfirmed: the fence decides, as for any lease not renewed in time
            return [(task, sent) for task in tasks]
        lost = set(answer.lost)
        if lost:
            log.warning("%d claimed tasks lost before they started", len(lost))
        return [(task, renewing) for task in tasks if task.id not in lost]

    def _start(self, task: ClaimedTask, lease_from: float) -> None:
        running = _Running(task, TaskContext(task, self), lease_from, previous=self._running.get(task.id))
        self._running[task.id] = running
        self._busy += 1
        running.runner = asyncio.create_task(self._execute(running), name=f"taskgate-task-{task.id}")

    # --- running ---------------------------------------------------------------------------------

    async def _execute(self, running: _Running) -> None:
        try:
            if running.previous is not None and running.previous.runner is not None:
                # an abandoned sync handler of this task still runs here: never run it twice at once
                await asyncio.wait([running.previous.runner])
                running.previous = None
            report = await self._outcome(running)
        except asyncio.CancelledError:
            if running.abandoned is not None:
                self._finished(running)
                return
            report = {"outcome": "cancelled", "error": "cancelled by request"}
        self._finished(running)
        if running.abandoned is not None:
            return
        task = running.task
        self._queue_completion(_sendable({"id": str(task.id), "attempt": task.attempt, **report}))
        assert self._to_complete is not None
        self._to_complete.set()

    def _queue_completion(self, item: dict[str, Any]) -> None:
        self._pending.append(item)
        self._pending_since.setdefault(_run(item), time.monotonic())

    def _delivering(self, now: float) -> list[dict[str, Any]]:
        """The completions still worth their leases: queued less than DELIVER_FOR_S ago."""
        return [c for c in self._pending if now - self._pending_since.get(_run(c), now) < DELIVER_FOR_S]

    def _give_up_delivering(self) -> None:
        """Drop the completions that could not be delivered within DELIVER_FOR_S (the heartbeats
        no longer renew their leases): each task's lease expires and Taskgate retries it."""
        keep = self._delivering(time.monotonic())
        dropped = {_run(c) for c in self._pending} - {_run(c) for c in keep}
        if dropped:
            log.error("%d completions could not be delivered in %.0f s; dropped (their leases expire "
                      "and Taskgate retries those tasks)", len(dropped), DELIVER_FOR_S)  # fmt: skip
            self._settle(dropped)
            assert self._room is not None
            self._room.set()

    def _finished(self, running: _Running) -> None:
        self._busy -= 1
        if self._running.get(running.task.id) is running:
            del self._running[running.task.id]
        if running.abandoned is not None and self._room is not None:
            self._room.set()

    async def _outcome(self, running: _Running) -> dict[str, Any]:
        task, ctx = running.task, running.ctx
        kind = self.kinds.get(task.kind)
        if kind is None:
            return {"outcome": "failed", "error": f"kind {task.kind!r} is not declared in worker {self.name}"}
        try:
            payload: Any = (
                kind.payload.model_validate(task.payload) if kind.payload is not None else task.payload
            )
        except ValidationError as exc:
            return {"outcome": "permanent_failure", "error": f"payload does not match {kind.name!r}: {exc}"}
        try:
            if kind.is_async:
                value = await kind.handler(ctx, payload)
            else:
                loop = asyncio.get_running_loop()
                running.thread = loop.run_in_executor(self._pool, kind.handler, ctx, payload)
                value = await running.thread
                if inspect.isawaitable(value):  # an async handler behind a plain decorator
                    value = await value
        except _Suspend as suspended:
            return {"outcome": "suspended", "suspend": {k: v for k, v in suspended.suspend.items() if v}}
        except RetryLater as exc:
            return {"outcome": "failed", "error": str(exc) or "retry later", "retry_after_s": exc.after_s}
        except PermanentError as exc:
            return {"outcome": "permanent_failure", "error": str(exc) or type(exc).__name__}
        except TaskCancelled as exc:
            return {"outcome": "cancelled", "error": str(exc) or "cancelled"}
        except Exception as exc:
            log.warning("task %s failed: %s", task.id, _text(repr(exc), 1000))
            return {
                "outcome": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-MAX_TRACEBACK:],
            }
        spawns = ctx._take_spawns()
        if spawns:  # children spawned but never gathered: record them; the re-run finishes
            return {"outcome": "suspended", "suspend": {"spawn": spawns}}
        try:
            return {"outcome": "completed", "result": _result(kind, value)}
        except ValidationError as exc:
            return {
                "outcome": "failed",
                "error": f"result does not match the result model of {kind.name!r}: {exc}",
            }
        except Exception as exc:  # a model whose dump fails
            return {"outcome": "failed", "error": f"result cannot be serialized: {type(exc).__name__}: {exc}"}

    def _abandon(self, running: _Running, reason: str) -> None:
        """Stop running a task whose lease is gone. A sync handler cannot be interrupted: its run
        keeps its slot (no longer heartbeated) until the handler returns, and a new claim of the
        same task waits for it."""
        if running.abandoned is None:
            running.abandoned = reason
        running.ctx._cancel()
        in_thread = running.thread is not None and not running.thread.done()
        if running.runner is not None and not running.runner.done() and not in_thread:
            running.runner.cancel()

    # --- leases ----------------------------------------------------------------------------------

    def _margin_s(self) -> float:
        return max(1.0, self._lease_s / 5)

    async def _heartbeat_loop(self) -> None:
        assert self._client is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(self._lease_s / 3, self._margin_s() / 2))
            now = time.monotonic()
            if now - last < self._lease_s / 3:
                continue
            last = now
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        assert self._client is not None
        # the runs this heartbeat speaks for: its answer may come back after one of them ended and
        # a newer run of the same task was claimed here, which it must not renew, cancel or abandon
        runs = {i: r for i, r in self._running.items() if r.abandoned is None}
        held = [*runs, *(UUID(c["id"]) for c in self._delivering(time.monotonic()))]
        if not held:
            return
        progress, self._progress = self._progress, {}
        still_held = set(held)
        progress = {k: v for k, v in progress.items() if k in still_held}
        sent = time.monotonic()
        chunks = [held[i : i + MAX_HEARTBEAT] for i in range(0, len(held), MAX_HEARTBEAT)]
        answers = await asyncio.gather(
            *(self._renew(chunk, {k: progress[k] for k in chunk if k in progress}) for chunk in chunks)
        )
        for answer in answers:
            if answer is not None:
                self._renewed(answer, sent, runs)

    def _current(self, task_id: UUID, runs: dict[UUID, _Running]) -> _Running | None:
        """The run of `task_id` a heartbeat answered for, if it is still this task's latest run."""
        running = self._running.get(task_id)
        return running if running is not None and runs.get(task_id) is running else None

    def _renewed(self, answer: Heartbeat, sent: float, runs: dict[UUID, _Running]) -> None:
        for lease in answer.items:
            running = self._current(lease.id, runs)
            if running is None:
                continue
            running.lease_from = max(running.lease_from, sent)
            if lease.cancel_requested and not running.ctx.cancelled:
                running.ctx._cancel()
                in_thread = running.thread is not None and not running.thread.done()
                if running.runner is not None and not in_thread:
                    running.runner.cancel()  # async handlers are interrupted; sync ones see ctx.cancelled
        pending = {c["id"] for c in self._pending}
        for task_id in answer.lost:
            running = self._current(task_id, runs)
            if running is not None and str(task_id) not in pending:
                log.warning("lease lost; abandoning task %s", task_id)
                self._abandon(running, "lease lost")

    async def _renew(self, held: list[UUID], progress: dict[UUID, Any]) -> Heartbeat | None:
        """One heartbeat. Progress the server refuses is dropped, and the leases renewed without
        it; progress that could not be sent is kept for the next heartbeat."""
        assert self._client is not None
        try:
            answer: Heartbeat = await asyncio.wait_for(
                self._client.heartbeat(
                    held, worker=self.identity, progress={str(k): v for k, v in progress.items()}
                ),
                timeout=self._lease_s / 3,
            )
            return answer
        except ApiError as exc:
            if progress and 400 <= exc.status < 500:
                log.warning("heartbeat refused; sending it again without its progress: %s", exc)
                return await self._renew(held, {})
            self._keep_progress(progress)  # a server error, not a refusal of the progress
            log.warning("heartbeat failed: %s", exc)
        except Exception as exc:
            self._keep_progress(progress)
            log.warning("heartbeat failed: %s", exc or type(exc).__name__)
        return None

    def _keep_progress(self, progress: dict[UUID, Any]) -> None:
        """Progress a heartbeat could not deliver goes with the next one (unless newer came)."""
        for task_id, value in progress.items():
            self._progress.setdefault(task_id, value)

    async def _fence_loop(self) -> None:
        """Fences on its own timer: a heartbeat in flight (up to a third of the lease) must not
        hold back giving up a lease that has gone unconfirmed."""
        while True:
            await asyncio.sleep(FENCE_EVERY_S)
            self._fence(time.monotonic())

    def _fence(self, now: float) -> None:
        """Abandon handlers whose lease could not be confirmed: stop before someone else starts."""
        for running in list(self._running.values()):
            if running.abandoned is None and now >= running.lease_from + self._lease_s - self._margin_s():
                log.warning("lease of task %s unconfirmed; abandoning it", running.task.id)
                self._abandon(running, "lease unconfirmed")

    # --- completing ------------------------------------------------------------------------------

    async def _complete_loop(self) -> None:
        assert self._to_complete is not None
        failures = 0
        while True:
            await self._to_complete.wait()
            self._to_complete.clear()
            try:
                while self._pending:
                    await self._flush()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("completing failed; retrying: %s", exc)
                self._give_up_delivering()
                await asyncio.sleep(min(5.0, 0.25 * 2**failures))
                self._to_complete.set()

    async def _flush_all(self) -> None:
        while self._pending:
            await self._flush()

    async def _flush(self) -> None:
        assert self._room is not None
        await self._send(self._next_batch())
        self._room.set()

    def _next_batch(self) -> list[dict[str, Any]]:
        """The oldest completions that fit one request: by count, by encoded size, and by the
        children and steps their suspensions carry in all."""
        batch: list[dict[str, Any]] = []
        size = spawns = steps = 0
        for item in self._pending[:MAX_COMPLETE_BATCH]:
            size += _encoded_size(item) + 1
            suspend = item.get("suspend") or {}
            spawns += len(suspend.get("spawn") or ())
            steps += len(suspend.get("steps") or ())
            over = size > MAX_COMPLETE_BYTES or spawns > MAX_COMPLETE_SPAWNS or steps > MAX_COMPLETE_STEPS
            if batch and over:
                break
            batch.append(item)
        return batch

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        """Complete `batch`; a batch the server refuses is halved until the refused item is alone."""
        assert self._client is not None
        try:
            answers = await self._client.complete(batch, worker=self.identity)
        except ApiError as exc:
            if exc.status not in REFUSED:
                raise
            if len(batch) == 1:
                await self._send_refused(batch[0], exc)
                return
            half = len(batch) // 2
            await self._send(batch[:half])
            await self._send(batch[half:])
            return
        self._settle({_run(item) for item in batch})
        asked = {item["id"]: item["outcome"] for item in batch}
        refused = [a for a in answers if not a.accepted]
        written = [a for a in refused if a.status in _WRITTEN_AS.get(asked.get(str(a.id), ""), ())]
        if written:
            log.info("%d completions were already written (their tasks are %s, as they asked): a request "
                     "sent again", len(written), _statuses(written))  # fmt: skip
        if len(refused) > len(written):
            lost = [a for a in refused if a not in written]
            log.info("%d completions refused: their leases were lost (their tasks are %s)",
                     len(lost), _statuses(lost))  # fmt: skip

    async def _send_refused(self, item: dict[str, Any], refusal: ApiError) -> None:
        """Report a completion the server refuses as a failed attempt; refused again, let it go:
        its lease expires and Taskgate retries the task. A refused suspension fails the task for
        good: the handler's replay (deterministic, by the composition rule) would ask the same."""
        assert self._client is not None
        log.error("completion of task %s refused; reporting the attempt failed: %s", item["id"], refusal)
        error = _text(f"completion refused: {refusal}", MAX_ERROR)
        outcome = "permanent_failure" if item.get("outcome") == "suspended" else "failed"
        failed = {"id": item["id"], "attempt": item["attempt"], "outcome": outcome, "error": error}
        try:
            await self._client.complete([failed], worker=self.identity)
        except ApiError as exc:
            if exc.status not in REFUSED:
                raise
            log.error("completion of task %s refused again; dropped (its lease will expire): %s",
                      item["id"], exc)  # fmt: skip
        self._settle({_run(item)})

    def _settle(self, runs: set[tuple[str, int]]) -> None:
        """Forget the completions of these runs (task id, attempt). By run, not by task: a suspended
        run's task is available again as soon as the server writes it, and the completion of the next
        run, claimed here meanwhile, may be queued before the answer about the first comes back."""
        self._pending = [c for c in self._pending if _run(c) not in runs]
        for run in runs:
            self._pending_since.pop(run, None)


def _run(item: dict[str, Any]) -> tuple[str, int]:
    """The run a completion item reports on: its task and attempt."""
    return str(item["id"]), int(item["attempt"])


def _deleted_kinds(exc: ApiError, kinds: list[str]) -> list[str]:
    """The kinds of a claim (sent as `kinds`) that a 422 names as no remote kind of this client."""
    if exc.status != 422:
        return []
    named = []
    for error in exc.errors:
        field = str(error.get("field", ""))
        if error.get("type") != "unknown_kind" or not field.startswith("body.kinds."):
            continue
        index = field[len("body.kinds.") :]
        if index.isdigit() and int(index) < len(kinds):
            named.append(kinds[int(index)])
    return named


def _statuses(answers: list[CompletionAnswer]) -> str:
    """`3 completed, 1 retryable`: the tasks' statuses in a completion answer, counted."""
    counts: dict[str, int] = {}
    for answer in answers:
        status = answer.status or "gone"  # null: no such task (any more)
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _stopped(running: _Running) -> bool:
    """Nothing of this run's task still runs here: its handler ended, and so did any abandoned
    run of the same task it was waiting for."""
    runners = [running.runner, running.previous.runner if running.previous is not None else None]
    return all(runner is None or runner.done() for runner in runners) and running.runner is not None


def _check_name(what: str, name: Any) -> None:
    """A step's, sleep's or child's name as the server stores it (durable.check_name)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
        raise PermanentError(f"a {what} must be 1 to {MAX_NAME} characters, none of them NUL")


def _check_wait(what: str, name: str, seconds: float) -> None:
    """A sleep's length or a signal wait's timeout: at most 366 days (durable.check_wait)."""
    if not math.isfinite(float(seconds)) or float(seconds) > MAX_DELAY_S:
        raise PermanentError(
            f"the {what} {str(name)[:MAX_NAME]!r} is {float(seconds)} s; it may be at most "
            f"{MAX_DELAY_S} s (366 days)"
        )


def _check_step_result(name: str, value: Any) -> None:
    """A step's result as the server stores it: JSON of at most 1 MiB, without NUL characters
    (durable.check_step_result)."""
    try:
        value = dump(value)
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise PermanentError(f"step {name!r} returned what cannot be stored: not JSON: {exc}") from None
    if _contains_nul(value):
        raise PermanentError(f"step {name!r} returned what cannot be stored: {NUL_MESSAGE}")
    if len(text.encode()) > MAX_STEP_RESULT_BYTES:
        raise PermanentError(f"step {name!r} returned more than 1 MiB of JSON")


def _contains_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in a string or a key (iterative: no depth bound)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _text(value: str, limit: int) -> str:
    """`value` as the server stores text: no NUL character, at most `limit` characters."""
    value = value.replace("\x00", "\\x00")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _encoded_size(item: dict[str, Any]) -> int:
    """The bytes `item` takes in a request body, encoded as httpx encodes it."""
    text = json.dumps(dump(item), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return len(text.encode())


def _sendable(item: dict[str, Any]) -> dict[str, Any]:
    """A completion the server can take: texts within its limits, and a report that encodes as
    JSON within a request body (otherwise the attempt fails and says why)."""
    if item.get("error"):
        item["error"] = _text(item["error"], MAX_ERROR)
    if item.get("traceback"):
        item["traceback"] = _text(item["traceback"], MAX_STORED_TRACEBACK)
    try:
        size = _encoded_size(item)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = f"what this attempt returned cannot be encoded as JSON: {type(exc).__name__}: {exc}"
    else:
        if size <= MAX_COMPLETE_BYTES:
            return item
        problem = (
            f"what this attempt returned is {size} bytes of JSON; at most {MAX_COMPLETE_BYTES} are taken"
        )
        if item.get("outcome") == "suspended":
            return _split_suspension(item, problem)
    log.warning("task %s: %s", item["id"], problem)
    return {
        "id": item["id"],
        "attempt": item["attempt"],
        "outcome": "failed",
        "error": _text(problem, MAX_ERROR),
    }


def _split_suspension(item: dict[str, Any], problem: str) -> dict[str, Any]:
    """A suspension past one request's body: its children (each payload up to what an enqueue
    takes) are what makes it so, as its step is at most 1 MiB. It carries its step and the children
    that fit, without its wait, so that the task runs again at once: the replay spawns the others
    (those created come back by key) and reaches the wait with them, as often as it takes. Failed
    instead, the attempt was retried, its step run again each time, and the task discarded on its
    last attempt, where in-process the same handler runs. A child that fits no request alone can
    never be sent: the task fails for good (its replay would ask the same)."""
    suspend = dict(item.get("suspend") or {})
    spawn = list(suspend.pop("spawn", None) or ())
    suspend.pop("wait", None)
    carried = {**item, "suspend": suspend}
    room = MAX_COMPLETE_BYTES - _encoded_size(carried) - len('"spawn":[],')
    fitting: list[dict[str, Any]] = []
    for child in spawn:
        room -= _encoded_size(child) + 1
        if room < 0:
            break
        fitting.append(child)
    if not fitting:
        log.warning("task %s: %s", item["id"], problem)
        return {
            "id": item["id"],
            "attempt": item["attempt"],
            "outcome": "permanent_failure",
            "error": _text(f"{problem}: child {spawn[0].get('key')!r} alone is past it", MAX_ERROR)
            if spawn
            else _text(problem, MAX_ERROR),
        }
    log.info("task %s: %d of its %d new children sent with this suspension (one request's body); "
             "the task runs again at once for the others", item["id"], len(fitting), len(spawn))  # fmt: skip
    carried["suspend"] = {**suspend, "spawn": fitting}
    return carried


def _result(kind: RegisteredKind[Any], value: Any) -> Any:
    if kind.result is not None:
        data = model_json(value) if isinstance(value, BaseModel) else value
        return model_json(kind.result.model_validate(data))
    if isinstance(value, BaseModel):
        return model_json(value)
    return value


AsyncHandler = Callable[[TaskContext, Any], Awaitable[Any]]
