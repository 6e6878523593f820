"""The worker runtime: claim in batches, run at most WORKER_CONCURRENCY handlers, hold leases,
write completions in batches, and stop gracefully.

Started by `serve` with the worker role and by `python -m app worker`, in the serving lifecycle
(never at import). The parts: claiming (capacity, wake-ups, staging of due tasks), executing (one
task → one typed completion), completing (batched writes) and leases (heartbeats, cancel requests,
self-fencing). Correctness lives in the database: every claim, heartbeat, completion and release
is one guarded statement (app/src/database/tasks.py), so a worker that dies loses nothing (its
leases expire and the rescuer retries its tasks) and a slow one cannot overwrite a task that
someone else finished.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from app.src.api.engine.durable import state_full
from app.src.api.engine.outcomes import Backoff
from app.src.api.kinds import REGISTRY, KindRegistry, LeaseLost, PermanentError, TaskContext
from app.src.database import durable as durable_store
from app.src.database import tasks as task_store
from app.src.database import workers as worker_store
from app.src.database.durable import DurableState, Unloadable
from app.src.database.tasks import ClaimedTask
from app.src.utils import tracing
from app.src.utils.metrics import LAG, WORKER_CAPACITY, WORKER_RUNNING
from app.version import __version__
from app.worker.claiming import Claimer
from app.worker.completing import Completer
from app.worker.executing import Executor
from app.worker.leases import Holdings, LeaseKeeper, Running

if TYPE_CHECKING:
    from app.database import Database
    from app.settings import Settings
    from app.src.api.engine.caches import QueueCache
    from app.src.database.notifications import Notifier

log = structlog.get_logger("taskgate.worker")

PROGRESS_TIMEOUT_S = 5.0
# after the grace period: the last completion writes and releases (a stop takes grace + this at most)
FINAL_WRITES_S = 0.5
# How long a handler cancelled at the end of the grace may take to unwind (its `finally` blocks):
# one that takes longer, or swallows the cancel, must not hold up the completions of the others.
UNWIND_S = 0.25


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
        queue_settings: QueueCache,
    ) -> None:
        self.id = uuid.uuid4()
        self.db = db
        self.queue_settings = queue_settings
        self.notifier = notifier
        self.resources: Mapping[str, Any] = resources or {}
        self.grace_s = settings.WORKER_SHUTDOWN_GRACE_S
        self.poll_s = settings.WORKER_POLL_INTERVAL_S
        self.holdings = Holdings()
        self.leases = LeaseKeeper(
            db, self.holdings, worker_id=self.id, lease_s=float(settings.LEASE_SECONDS), seen=self._seen
        )
        self.kinds = [kind.name for kind in registry.all()]
        self.claimer = Claimer(
            db,
            self.holdings,
            self.leases,
            worker_id=self.id,
            concurrency=settings.WORKER_CONCURRENCY,
            batch_size=settings.WORKER_BATCH_SIZE,
            poll_s=settings.WORKER_POLL_INTERVAL_S,
            queues=list(settings.WORKER_QUEUES) or None,
            start=self._start,
        )
        self.executor = Executor(
            registry,
            queue_backoff=self._queue_backoff,
            payload_context=payload_context,
            engine=self.resources.get("engine"),
            worker_id=self.id,
        )
        self.completer = Completer(db, self.holdings, worker_id=self.id, on_written=self.claimer.wake)
        self._claim_task: asyncio.Task[None] | None = None
        self._service_tasks: list[asyncio.Task[None]] = []
        # set by end_grace() (a second stop signal): stop() waits for no handler any more
        self._grace_ended = asyncio.Event()
        self.log = log.bind(worker_id=str(self.id))

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._claim_task is not None and not self._claim_task.done()

    async def start(self) -> None:
        self.notifier.on_available(self.claimer.notified)
        self.notifier.on_cancel(self._cancel_requested)
        self._claim_task = asyncio.create_task(self.claimer.run(), name="taskgate-worker-claim")
        self._service_tasks = [
            asyncio.create_task(self.claimer.stage_due(), name="taskgate-worker-stage"),
            asyncio.create_task(self.leases.run(), name="taskgate-worker-leases"),
            asyncio.create_task(self.completer.run(), name="taskgate-worker-complete"),
            asyncio.create_task(self._seen_at_start(), name="taskgate-worker-seen"),
            asyncio.create_task(self._poll_cancels(), name="taskgate-worker-cancels"),
        ]
        WORKER_CAPACITY.set(self.claimer.concurrency)
        self.log.info(
            "worker started",
            concurrency=self.claimer.concurrency,
            batch=self.claimer.batch_size,
            queues=self.claimer.queues,
        )

    def stop_claiming(self) -> None:
        """Claim nothing more (idempotent): the first step of a shutdown."""
        self.claimer.stop()

    def end_grace(self) -> None:
        """A forced stop (a second stop signal): the grace is over, also for a `stop()` already
        waiting in it. Running handlers are cancelled and their tasks handed back at once."""
        self.stop_claiming()
        self._grace_ended.set()

    async def stop(self, *, grace_s: float | None = None) -> None:
        """Stop claiming; let running tasks finish within the grace period; release the rest.

        Handlers get all of `grace_s` (default WORKER_SHUTDOWN_GRACE_S), or until `end_grace()`;
        then unwritten completions are written and unfinished tasks released within
        FINAL_WRITES_S more. When PostgreSQL cannot be reached, what could not be written is left
        to the leases: they expire and the rescuer retries those tasks.
        """
        loop = asyncio.get_running_loop()
        grace = self.grace_s if grace_s is None else max(0.0, grace_s)
        deadline = loop.time() + grace
        self.stop_claiming()
        if self._claim_task is not None:
            await self._within_grace([self._claim_task], deadline)
        in_flight = [r.task for r in self.holdings.running.values() if r.task is not None]
        if in_flight and not self._grace_ended.is_set():
            self.log.info("waiting for running tasks", count=len(in_flight), grace_s=grace)
            await self._within_grace(in_flight, deadline)
        leftover = list(self.holdings.running.values())
        for running in leftover:
            self.holdings.abandon(running, "shutdown")
        # The handlers, the claim loop and the service loops unwind together, within UNWIND_S: a
        # statement cancelled on a stalled connection is released only once PostgreSQL confirms
        # the cancel, or after DB_COMMAND_TIMEOUT_S, which must not stretch the stop. What is
        # still unwinding then is left behind; the pools' close cuts its connection.
        services = [*self._service_tasks, *([self._claim_task] if self._claim_task is not None else [])]
        for service in services:
            service.cancel()
        unwinding = [r.task for r in leftover if r.task is not None] + services
        if unwinding:
            await asyncio.wait(unwinding, timeout=UNWIND_S)
        # A handler still running cannot be released: another worker would run its task while it
        # still does. Its lease, no longer renewed, expires after this process has exited.
        stuck = [r for r in leftover if r.task is not None and not r.task.done()]
        if stuck:
            self.log.warning(
                "handlers did not stop when cancelled; their tasks are left to their leases",
                count=len(stuck),
                task_ids=[str(r.claimed.id) for r in stuck],
            )
            leftover = [r for r in leftover if r not in stuck]
        if any(not service.done() for service in services):
            self.log.warning(
                "worker loops did not stop when cancelled; left behind",
                loops=sorted(service.get_name() for service in services if not service.done()),
            )
        await self._write_last(leftover, timeout_s=FINAL_WRITES_S)
        WORKER_RUNNING.set(0)
        self.log.info("worker stopped")

    async def _within_grace(self, tasks: list[asyncio.Task[None]], deadline: float) -> None:
        """Wait for `tasks` until the loop time `deadline`, or until the grace is ended early."""
        every = asyncio.ensure_future(asyncio.wait(tasks))  # cancelled, it leaves the tasks running
        ended = asyncio.ensure_future(self._grace_ended.wait())
        try:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait([every, ended], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            every.cancel()
            ended.cancel()

    async def _write_last(self, leftover: list[Running], *, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self.completer.flush(timeout_s=timeout_s)
                if leftover:
                    async with self.db.driver() as conn:
                        released = await task_store.release(
                            conn, [r.claimed for r in leftover], worker_id=self.id
                        )
                    self.log.info("released unfinished tasks", count=len(released))
        except Exception as exc:
            self.log.warning(
                "could not write the last completions; their leases expire and they are retried",
                error=str(exc) or type(exc).__name__,
                unwritten=len(self.holdings.pending),
                unreleased=len(leftover),
            )

    # --- running ---------------------------------------------------------------------------------

    def _start(
        self, claimed: ClaimedTask, lease_from: float, state: DurableState | Unloadable | None = None
    ) -> None:
        unloadable = state if isinstance(state, Unloadable) else None
        if isinstance(state, Unloadable):
            state = None
        ctx = TaskContext(
            task_id=claimed.id,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            queue=claimed.queue,
            kind=claimed.kind,
            client_id=claimed.client_id,
            progress=self._report_progress,
            resources=self.resources,
            state=state,
            checkpoint=self._checkpoint_step,
        )
        running = Running(
            claimed, ctx, lease_from, unloadable=unloadable, state_bytes=state.size if state else 0
        )
        self.holdings.running[claimed.id] = running
        running.task = asyncio.create_task(self._execute(running))
        LAG(claimed.queue).observe(max(0.0, (claimed.started_at - claimed.run_at).total_seconds()))
        WORKER_RUNNING.set(len(self.holdings.running))

    async def _execute(self, running: Running) -> None:
        claimed = running.claimed
        # this asyncio task runs in its own copy of the context: every log line a handler writes
        # carries the task and its tenant, and nothing leaks to other tasks
        structlog.contextvars.bind_contextvars(task_id=str(claimed.id), client_id=str(claimed.client_id))
        try:
            if tracing.active() or claimed.kind == "http":  # only then is the trace context needed
                running.ctx.traceparent = await self._traceparent(claimed.id)
            with tracing.attempt_span(
                traceparent=running.ctx.traceparent,
                task_id=str(claimed.id),
                kind=claimed.kind,
                queue=claimed.queue,
                attempt=claimed.attempt,
            ):
                completion = await self.executor.run(running)
        except asyncio.CancelledError:
            if running.abandoned is None:
                self.holdings.room.set()  # its slot is free whatever comes next
                raise
            return  # shutdown releases it; a lost lease belongs to whoever holds the task now
        except Exception as exc:
            # Deciding the completion failed (the queue's backoff could not be read, say): the
            # attempt is left to its lease, which is no longer renewed; the rescuer retries it.
            self.log.warning("could not conclude an attempt", task_id=str(claimed.id), error=repr(exc))
            running.abandoned = "unconcluded"
            return
        finally:
            # Only this run: a suspension makes its task available at once, and this worker may
            # have claimed and started the next run of it before this one got here.
            if self.holdings.running.get(claimed.id) is running:
                del self.holdings.running[claimed.id]
            if running.abandoned is not None:
                self.holdings.room.set()
        if running.abandoned is not None:
            return
        if completion is None:  # suspended: written already; its slot is free
            self.holdings.room.set()
            self.claimer.wake()
            return
        self.completer.add(completion)

    async def _seen_at_start(self) -> None:
        """Seen from the start (blocked_by's no_worker), not only after the first heartbeat round."""
        try:
            async with asyncio.timeout(5.0):
                await self._seen(0)
        except Exception as exc:
            self.log.debug("recording the worker failed", error=str(exc) or type(exc).__name__)

    async def _seen(self, running: int) -> None:
        """This worker's row in GET /api/workers (client_id NULL: it serves every client)."""
        async with self.db.driver() as conn:
            await worker_store.seen(
                conn,
                worker_id=self.id,
                client_id=None,
                name=f"in-process@{socket.gethostname()}:{os.getpid()}",
                version=__version__,
                remote=False,
                kinds=self.kinds,
                queues=self.claimer.queues,
                running=running,
            )

    async def _traceparent(self, task_id: UUID) -> str | None:
        """The trace context the task was enqueued in; a trace is not worth failing a task for."""
        try:
            async with asyncio.timeout(PROGRESS_TIMEOUT_S), self.db.driver() as conn:
                return (await task_store.traceparents(conn, [task_id])).get(task_id)
        except Exception:
            return None

    async def _queue_backoff(self, queue_id: int) -> Backoff:
        return (await self.queue_settings.by_ids({queue_id}))[queue_id]

    async def _checkpoint_step(self, ctx: TaskContext, name: str, result: Any) -> None:
        """Store a step that succeeded before its handler goes on (guarded by the lease)."""
        async with asyncio.timeout(PROGRESS_TIMEOUT_S), self.db.driver() as conn:
            stored = await durable_store.checkpoint_step(
                conn, task_id=ctx.task_id, attempt=ctx.attempt, worker_id=self.id, name=name, result=result
            )
        if not stored.owned:
            raise LeaseLost()
        if stored.over_limit:
            raise PermanentError(f"a task may hold at most {durable_store.MAX_STEPS} steps")
        if stored.over_bytes:
            raise PermanentError(state_full(name))

    async def _report_progress(self, task_id: UUID, attempt: int, progress: dict[str, Any]) -> None:
        async with asyncio.timeout(PROGRESS_TIMEOUT_S), self.db.driver() as conn:
            await task_store.set_progress(
                conn, task_id=task_id, attempt=attempt, worker_id=self.id, progress=progress
            )

    async def _poll_cancels(self) -> None:
        """While no notification can arrive (no LISTEN connection behind PgBouncer, or LISTEN down
        meanwhile), read the cancel requests of the running tasks every WORKER_POLL_INTERVAL_S, as
        every other wait polls: a cancel otherwise reached its handler only with the next
        heartbeat, a third of the lease later (10 s with the default lease)."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.notifier.listening and self.notifier.connected.is_set():
                continue
            asked = [
                tid for tid, running in self.holdings.running.items() if not running.ctx.cancelled.is_set()
            ]
            if not asked:
                continue
            try:
                async with asyncio.timeout(PROGRESS_TIMEOUT_S), self.db.driver() as conn:
                    cancelled = await task_store.cancels_requested(conn, task_ids=asked, worker_id=self.id)
            except Exception as exc:  # the next heartbeat still carries it
                self.log.debug("reading cancel requests failed", error=str(exc) or type(exc).__name__)
                continue
            for task_id in cancelled:
                self._cancel_requested(task_id)

    def _cancel_requested(self, task_id: UUID) -> None:
        running = self.holdings.running.get(task_id)
        if running is not None:
            running.ctx.cancelled.set()


__all__ = ["Worker"]
