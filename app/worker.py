"""The worker runtime: claim in batches, run at most WORKER_CONCURRENCY handlers, hold leases,
write completions in batches, and stop gracefully.

Started by `serve` with the worker role and by `python -m app worker`, in the serving lifecycle
(never at import). Correctness lives in the database: every claim, heartbeat, completion and
release is one guarded statement (app/src/database/tasks.py), so a worker that dies loses nothing
(its leases expire and the rescuer retries its tasks) and a slow one cannot overwrite a task that
someone else finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from pydantic import BaseModel, ValidationError

from app.src.api.kinds import (
    REGISTRY,
    Deferred,
    KindRegistry,
    PermanentError,
    RetryLater,
    TaskCancelled,
    TaskContext,
    WaitExternal,
)
from app.src.api.state_machine import Status, after_failure, backoff_seconds, transition
from app.src.database import tasks as store
from app.src.database.tasks import ClaimedTask, Completion
from app.src.utils import json_text
from app.src.utils.metrics import LAG, OUTCOMES, WORKER_RUNNING

if TYPE_CHECKING:
    from app.database import Database
    from app.settings import Settings
    from app.src.database.notifications import Notifier

log = structlog.get_logger("taskgate.worker")
MAX_ERROR_CHARS = 2000


@dataclass(slots=True)
class Running:
    claimed: ClaimedTask
    ctx: TaskContext
    task: asyncio.Task[None] | None = None
    abandoned: str | None = None  # "shutdown" or "lease lost": finish without writing a result
    started: float = field(default_factory=time.perf_counter)


class Worker:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        settings: Settings,
        registry: KindRegistry = REGISTRY,
        *,
        resources: Mapping[str, Any] | None = None,
        payload_context: Mapping[str, Any] | None = None,
    ) -> None:
        self.id = uuid.uuid4()
        self.db = db
        self.notifier = notifier
        self.registry = registry
        self.resources: Mapping[str, Any] = resources or {}
        # the same validation context as at enqueue, so a payload valid then is valid now
        self.payload_context = payload_context
        self.concurrency = settings.WORKER_CONCURRENCY
        self.batch_size = settings.WORKER_BATCH_SIZE
        self.lease_s = float(settings.LEASE_SECONDS)
        self.poll_s = settings.WORKER_POLL_INTERVAL_S
        self.grace_s = settings.WORKER_SHUTDOWN_GRACE_S
        self.queues = list(settings.WORKER_QUEUES) or None
        self._running: dict[UUID, Running] = {}
        self._pending: list[Completion] = []
        self._wake = asyncio.Event()
        self._capacity = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._flushed = asyncio.Event()
        self._stopping = False
        self._claim_task: asyncio.Task[None] | None = None
        self._service_tasks: list[asyncio.Task[None]] = []
        self._limited: tuple[float, list[int]] = (0.0, [])
        self.last_claim_at = 0.0
        self.log = log.bind(worker_id=str(self.id))

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._claim_task is not None and not self._claim_task.done()

    async def start(self) -> None:
        self.notifier.on_available(lambda _queues: self._wake.set())
        self.notifier.on_cancel(self._cancel_requested)
        self._claim_task = asyncio.create_task(self._claim_loop(), name="taskgate-worker-claim")
        self._service_tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="taskgate-worker-heartbeat"),
            asyncio.create_task(self._flush_loop(), name="taskgate-worker-flush"),
        ]
        self.log.info(
            "worker started", concurrency=self.concurrency, batch=self.batch_size, queues=self.queues
        )

    def stop_claiming(self) -> None:
        """Claim nothing more, at once (the first step of a stop); idempotent, and safe to call
        before `start`. A claim already in flight completes and its tasks run."""
        self._stopping = True
        self._wake.set()
        self._capacity.set()

    async def stop(self) -> None:
        """Stop claiming; let running tasks finish within the grace period; release the rest."""
        self._stopping = True
        self._wake.set()
        self._capacity.set()
        if self._claim_task is not None:
            await asyncio.gather(self._claim_task, return_exceptions=True)
        in_flight = [r.task for r in self._running.values() if r.task is not None]
        if in_flight:
            self.log.info("waiting for running tasks", count=len(in_flight), grace_s=self.grace_s)
            await asyncio.wait(in_flight, timeout=self.grace_s)
        leftover = list(self._running.values())
        for running in leftover:
            running.abandoned = "shutdown"
            if running.task is not None:
                running.task.cancel()
        await asyncio.gather(*(r.task for r in leftover if r.task is not None), return_exceptions=True)
        await self._flush_pending(final=True)
        if leftover:
            async with self.db.driver() as conn:
                released = await store.release(
                    conn, task_ids=[r.claimed.id for r in leftover], worker_id=self.id
                )
            self.log.info("released unfinished tasks", count=len(released))
        for service in self._service_tasks:
            service.cancel()
        await asyncio.gather(*self._service_tasks, return_exceptions=True)
        self.log.info("worker stopped")

    # --- claiming --------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_stage = 0.0
        failures = 0
        while not self._stopping:
            held = self._held()
            free = self.concurrency - held
            if free <= 0 or (held and free < self._claim_threshold()):
                self._capacity.clear()
                await self._capacity.wait()
                continue
            want = min(free, self.batch_size)
            self._wake.clear()
            try:
                claimed = await self._claim(want)
                if not claimed and loop.time() - last_stage >= self.poll_s:
                    last_stage = loop.time()
                    async with self.db.driver() as conn:
                        if await store.stage_due(conn):
                            continue
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(self.poll_s * 2**failures, 30.0)
                self.log.warning("claim failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            self.last_claim_at = time.monotonic()
            for task in claimed:
                self._start(task)
            WORKER_RUNNING.set(len(self._running))
            if len(claimed) >= want or self._stopping:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)

    def _held(self) -> int:
        # A task whose completion is not written yet is still running in the database: it counts
        # against the concurrency, or claims would outrun completion writes without bound.
        return len(self._running) + len(self._pending)

    def _claim_threshold(self) -> int:
        # claim again once a quarter of a batch is free: fewer, fuller round trips
        return max(1, min(self.batch_size, self.concurrency) // 4)

    async def _claim(self, want: int) -> list[ClaimedTask]:
        async with self.db.driver() as conn:
            claimed = await store.claim_available(
                conn, limit=want, lease_s=self.lease_s, worker_id=self.id, queues=self.queues
            )
            if len(claimed) < want:
                for queue_id in await self._limited_queues(conn):
                    if len(claimed) >= want:
                        break
                    claimed += await store.claim_limited(
                        conn,
                        queue_id=queue_id,
                        limit=want - len(claimed),
                        lease_s=self.lease_s,
                        worker_id=self.id,
                    )
        return claimed

    async def _limited_queues(self, conn: Any) -> list[int]:
        fetched_at, ids = self._limited
        if time.monotonic() - fetched_at > self.poll_s:
            ids = await store.limited_queue_ids(conn, queues=self.queues)
            self._limited = (time.monotonic(), ids)
        return ids

    # --- running ---------------------------------------------------------------------------------

    def _start(self, claimed: ClaimedTask) -> None:
        ctx = TaskContext(
            task_id=claimed.id,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            queue=claimed.queue,
            kind=claimed.kind,
            client_id=claimed.client_id,
            progress=self._report_progress,
            resources=self.resources,
        )
        running = Running(claimed, ctx)
        self._running[claimed.id] = running
        running.task = asyncio.create_task(self._execute(running))
        LAG(claimed.queue).observe(max(0.0, (claimed.started_at - claimed.run_at).total_seconds()))

    async def _execute(self, running: Running) -> None:
        claimed = running.claimed
        # this asyncio task runs in its own copy of the context: every log line a handler writes
        # carries the task and its tenant, and nothing leaks to other tasks
        structlog.contextvars.bind_contextvars(task_id=str(claimed.id), client_id=str(claimed.client_id))
        try:
            completion = await self._run_handler(running)
        except asyncio.CancelledError:
            if running.abandoned is None:
                raise
            return  # shutdown releases it; a lost lease belongs to whoever holds the task now
        finally:
            self._running.pop(claimed.id, None)
            if running.abandoned is not None:
                self._capacity.set()
        if running.abandoned is not None:
            return
        self._pending.append(completion)
        self._flush_needed.set()

    async def _run_handler(self, running: Running) -> Completion:
        claimed, ctx = running.claimed, running.ctx
        kind = self.registry.get(claimed.kind)
        if kind is None:
            return await self._failed(running, f"no task kind {claimed.kind!r} is declared in this worker")
        try:
            payload = kind.validate_payload(claimed.payload, context=self.payload_context)
        except ValidationError as exc:
            return self._finish(
                running,
                Status.DISCARDED,
                outcome="invalid_payload",
                error=_clip(f"payload no longer matches the contract of kind {kind.name!r}: {exc}"),
            )
        try:
            if kind.timeout_s is not None:
                async with asyncio.timeout(kind.timeout_s):
                    result = await kind(ctx, payload)
            else:
                result = await kind(ctx, payload)
            if kind.result is not None:
                result = kind.result.model_validate(
                    result.model_dump() if isinstance(result, BaseModel) else result
                ).model_dump(mode="json")
            elif isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
            _storable(result)
            return self._finish(running, Status.COMPLETED, outcome="completed", result=result)
        except RetryLater as exc:
            return await self._failed(
                running, str(exc), retry_after_s=exc.after_s, http_status=exc.http_status
            )
        except PermanentError as exc:
            return self._finish(
                running,
                Status.DISCARDED,
                outcome="failed",
                error=_clip(str(exc)),
                http_status=exc.http_status,
            )
        except Deferred as exc:
            # not an attempt: the attempt count goes back and no attempt record is written
            return self._finish(
                running, Status.RETRYABLE, outcome="deferred", retry_in_s=exc.after_s, refund=True
            )
        except TaskCancelled as exc:
            return self._finish(
                running, Status.CANCELLED, outcome="cancelled", error=_clip(str(exc) or "cancelled")
            )
        except WaitExternal as exc:
            return self._finish(
                running,
                Status.WAITING,
                outcome="waiting",
                state=exc.state,
                retry_in_s=exc.poll_after_s,
                http_status=exc.http_status,
            )
        except TimeoutError:
            return await self._failed(running, f"timed out after {kind.timeout_s} s")
        except ValidationError as exc:
            return await self._failed(
                running, _clip(f"result does not match the contract of {kind.name!r}: {exc}")
            )
        except Exception as exc:
            self.log.warning("task failed", task_id=str(claimed.id), kind=claimed.kind, error=repr(exc))
            return await self._failed(running, _clip(f"{type(exc).__name__}: {exc}"))

    async def _failed(
        self,
        running: Running,
        error: str,
        *,
        retry_after_s: float | None = None,
        http_status: int | None = None,
    ) -> Completion:
        claimed = running.claimed
        status = after_failure(attempt=claimed.attempt, max_attempts=claimed.max_attempts, permanent=False)
        retry_in_s = None
        if status is Status.RETRYABLE:
            queue = (await self.db.queues.by_ids({claimed.queue_id}))[claimed.queue_id]
            retry_in_s = backoff_seconds(
                attempt=claimed.attempt,
                min_backoff_s=queue.min_backoff_s,
                max_backoff_s=queue.max_backoff_s,
                retry_after_s=retry_after_s,
            )
        return self._finish(
            running,
            status,
            outcome="failed",
            error=_clip(error),
            retry_in_s=retry_in_s,
            http_status=http_status,
        )

    def _finish(self, running: Running, status: Status, *, outcome: str, **fields: Any) -> Completion:
        claimed = running.claimed
        transition(Status.RUNNING, status)  # the state machine has the last word
        if fields.get("http_status") is None:
            fields["http_status"] = running.ctx.http_status
        elapsed = timedelta(seconds=time.perf_counter() - running.started)
        return Completion(
            id=claimed.id,
            attempt=claimed.attempt,
            status=status,
            outcome=outcome,
            started_at=claimed.started_at,
            finished_at=claimed.started_at + elapsed,
            **fields,
        )

    async def _report_progress(self, task_id: UUID, attempt: int, progress: dict[str, Any]) -> None:
        async with self.db.driver() as conn:
            await store.set_progress(conn, task_id=task_id, attempt=attempt, progress=progress)

    def _cancel_requested(self, task_id: UUID) -> None:
        running = self._running.get(task_id)
        if running is not None:
            running.ctx.cancelled.set()

    # --- completions and leases ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_needed.wait()
            self._flush_needed.clear()
            try:
                await self._flush_pending()
            except Exception as exc:
                # the completions stay pending (their leases keep being renewed) and are retried
                self.log.warning("writing completions failed", error=str(exc), pending=len(self._pending))
                await asyncio.sleep(1.0)
                self._flush_needed.set()

    async def _flush_pending(self, *, final: bool = False) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            try:
                async with self.db.driver() as conn:
                    rows = await store.complete(conn, batch, worker_id=self.id)
            except BaseException:
                self._pending[:0] = batch
                raise
            self._capacity.set()
            WORKER_RUNNING.set(len(self._running))
            outcomes: dict[tuple[str, str, str], int] = {}
            for row in rows:
                if row["outcome"] == "deferred":  # a deferral is not an outcome of the task
                    continue
                key = (row["queue"], row["kind"], row["status"])
                outcomes[key] = outcomes.get(key, 0) + 1
            for key, count in outcomes.items():
                OUTCOMES(*key).inc(count)
            if len(rows) < len(batch):
                self.log.info("completions dropped: their leases were lost", count=len(batch) - len(rows))

    async def _heartbeat_loop(self) -> None:
        interval = self.lease_s / 3  # at least twice per lease (pgqueuer #323)
        while True:
            await asyncio.sleep(interval)
            held = [*self._running, *(c.id for c in self._pending)]
            if not held:
                continue
            try:
                async with self.db.driver() as conn:
                    alive = await store.heartbeat(
                        conn, task_ids=held, lease_s=self.lease_s, worker_id=self.id
                    )
            except Exception as exc:
                self.log.warning("heartbeat failed", error=str(exc))
                continue
            for task_id, cancel_requested in alive.items():
                running = self._running.get(task_id)
                if running is not None and cancel_requested:
                    running.ctx.cancelled.set()
            pending_ids = {c.id for c in self._pending}
            for task_id in held:
                running = self._running.get(task_id)
                if task_id not in alive and running is not None and task_id not in pending_ids:
                    self.log.warning("lease lost; abandoning the attempt", task_id=str(task_id))
                    running.abandoned = "lease lost"
                    if running.task is not None:
                        running.task.cancel()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _storable(result: Any) -> None:
    """A result PostgreSQL cannot store would fail the completion batch of every task with it; the
    task fails permanently instead (a handler that returns it will return it again)."""
    if result is None:
        return
    try:
        json_text.dumps(result)
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"the handler's result is not JSON: {exc}") from None
    if json_text.contains_nul(result):
        raise PermanentError(f"the handler's result cannot be stored: {json_text.NUL_MESSAGE}")
