"""What a worker holds in the database, and the leases that prove it: heartbeats and self-fencing.

A lease is the only proof that this worker may run a task. The database sets it to
`now() + lease_s` when a claim or heartbeat statement runs, which is never earlier than the moment
this process sent that statement; so `sent + lease_s` (on this process's monotonic clock) is a
lower bound of the lease as the rest of the cluster sees it. A handler runs only while that bound
minus a safety margin lies in the future: when heartbeats fail or hang (PostgreSQL unreachable,
a network stall), the worker cancels the handler and abandons the attempt *before* the rescuer can
hand the task to someone else. Without that fence, a stalled replica and the task's next attempt
would run at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

import structlog

from app.src.api.kinds import TaskContext
from app.src.database import tasks as task_store
from app.src.database.durable import Unloadable
from app.src.database.tasks import ClaimedTask, Completion

if TYPE_CHECKING:
    from app.database import Database

log = structlog.get_logger("taskgate.worker")


@dataclass(slots=True)
class Running:
    claimed: ClaimedTask
    ctx: TaskContext
    lease_from: float  # monotonic time the statement that last set its lease was sent
    task: asyncio.Task[None] | None = None
    abandoned: str | None = None  # why it ends without a result: "shutdown", "lease lost", ...
    unloadable: Unloadable | None = None  # why its stored state could not be loaded: it fails at once
    state_bytes: int = 0  # what its loaded state counts toward the worker's budget (claiming.py)
    started: float = field(default_factory=time.perf_counter)


class Holdings:
    """The tasks this worker holds in the database: running handlers and unwritten completions.

    Both count against the concurrency: a task whose completion is not written yet is still
    running in the database, or claims would outrun completion writes without bound.
    """

    def __init__(self) -> None:
        self.running: dict[UUID, Running] = {}
        self.pending: list[Completion] = []
        self.room = asyncio.Event()  # set whenever a slot frees (or the worker stops)

    def count(self) -> int:
        return len(self.running) + len(self.pending)

    def state_bytes(self) -> int:
        """The loaded state the running handlers hold (what the claims counted of it)."""
        return sum(running.state_bytes for running in self.running.values())

    def ids(self) -> list[UUID]:
        return [*self.running, *(c.id for c in self.pending)]

    def abandon(self, running: Running, reason: str) -> None:
        """End a handler without writing its result: the task belongs to someone else now."""
        if running.abandoned is None:
            running.abandoned = reason
        if running.task is not None and not running.task.done():
            running.task.cancel()


def fence_margin_s(lease_s: float) -> float:
    """How long before its lease a task is abandoned when the lease cannot be renewed.

    A fifth of the lease (at least a second) leaves time to cancel the handler before another
    worker could be given the task; heartbeats run every third of the lease, so one failed
    heartbeat never fences, two in a row do.
    """
    return max(1.0, lease_s / 5)


class LeaseKeeper:
    """Renews the leases of everything held, passes on cancel requests, and fences the worker."""

    def __init__(
        self,
        db: Database,
        holdings: Holdings,
        *,
        worker_id: UUID,
        lease_s: float,
        seen: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.seen = seen  # after each heartbeat round: records the worker in `workers` (GET /api/workers)
        self.holdings = holdings
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.interval_s = lease_s / 3  # at least twice per lease (pgqueuer #323)
        self.margin_s = fence_margin_s(lease_s)
        self.log = log.bind(worker_id=str(worker_id))

    def usable(self, lease_from: float, now: float | None = None) -> bool:
        """True while a lease set by a statement sent at `lease_from` surely still holds."""
        now = time.monotonic() if now is None else now
        return now < lease_from + self.lease_s - self.margin_s

    async def run(self) -> None:
        tick = min(self.interval_s, self.margin_s / 2)
        last_sent = time.monotonic()
        beat: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(tick)
                now = time.monotonic()
                self.fence(now)
                if (beat is None or beat.done()) and now - last_sent >= self.interval_s:
                    last_sent = now
                    beat = asyncio.create_task(self._beat(), name="taskgate-worker-heartbeat")
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat

    async def _beat(self) -> None:
        await self.heartbeat()
        if self.seen is not None:
            try:
                async with asyncio.timeout(self.interval_s):
                    await self.seen(self.holdings.count())
            except Exception as exc:
                self.log.debug("recording the worker failed", error=str(exc) or type(exc).__name__)

    async def heartbeat(self) -> None:
        held = self.holdings.ids()
        if not held:
            return
        # The runs this heartbeat speaks for. Its answer may come after one of them ended and this
        # worker claimed the task again (a suspension makes it available at once): the task is
        # then missing from the answer, which says nothing about the later run.
        sent_runs = dict(self.holdings.running)
        sent = time.monotonic()
        try:
            # a heartbeat that cannot finish within its interval is as good as a failed one
            async with asyncio.timeout(self.interval_s), self.db.driver() as conn:
                alive = await task_store.heartbeat(
                    conn, task_ids=held, lease_s=self.lease_s, worker_id=self.worker_id
                )
        except Exception as exc:
            self.log.warning("heartbeat failed", error=str(exc) or type(exc).__name__, held=len(held))
            return
        pending = {c.id for c in self.holdings.pending}
        for task_id in held:
            running = self.holdings.running.get(task_id)
            if running is None or running is not sent_runs.get(task_id):
                continue
            if task_id in alive:
                running.lease_from = max(running.lease_from, sent)
                if alive[task_id]:
                    running.ctx.cancelled.set()
            elif task_id not in pending:
                self.log.warning("lease lost; abandoning the attempt", task_id=str(task_id))
                self.holdings.abandon(running, "lease lost")

    def fence(self, now: float) -> None:
        for running in list(self.holdings.running.values()):
            if running.abandoned is None and not self.usable(running.lease_from, now):
                self.log.warning(
                    "lease could not be renewed; abandoning the attempt before it expires",
                    task_id=str(running.claimed.id),
                    unconfirmed_s=round(now - running.lease_from, 1),
                )
                self.holdings.abandon(running, "lease unconfirmed")
