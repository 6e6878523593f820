"""Completion writes: finished attempts go to PostgreSQL in batches, one statement per batch.

Each row is a compare-and-set (status running, same attempt, same worker): a completion whose
lease was rescued meanwhile is dropped by the database, never written over the task's new life.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from app.database import is_unstorable_value
from app.src.api.engine.outcomes import METRIC_OUTCOME, Outcome
from app.src.database import tasks as task_store
from app.src.database.tasks import Completion
from app.src.utils.metrics import DURATION, OUTCOMES, WORKER_RUNNING
from app.worker.leases import Holdings

if TYPE_CHECKING:
    from app.database import Database

log = structlog.get_logger("taskgate.worker")

MAX_BATCH = 1000
WRITE_TIMEOUT_S = 5.0  # one batch; a stalled write is retried rather than waited on
RETRY_AFTER_FAILURE_S = 0.5


class Completer:
    def __init__(
        self, db: Database, holdings: Holdings, *, worker_id: UUID, on_written: Callable[[], None]
    ) -> None:
        self.db = db
        self.holdings = holdings
        self.worker_id = worker_id
        self.on_written = on_written  # a slot freed: limited queues may have room again
        self._needed = asyncio.Event()
        self.log = log.bind(worker_id=str(worker_id))

    def add(self, completion: Completion) -> None:
        self.holdings.pending.append(completion)
        self._needed.set()

    async def run(self) -> None:
        while True:
            await self._needed.wait()
            self._needed.clear()
            try:
                await self.flush(timeout_s=WRITE_TIMEOUT_S)
            except Exception as exc:
                # the completions stay pending (their leases keep being renewed) and are retried
                self.log.warning(
                    "writing completions failed",
                    error=str(exc) or type(exc).__name__,
                    pending=len(self.holdings.pending),
                )
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                self._needed.set()

    async def flush(self, *, timeout_s: float) -> None:
        """Write every pending completion, each batch within `timeout_s`."""
        holdings = self.holdings
        while holdings.pending:
            batch, holdings.pending = holdings.pending[:MAX_BATCH], holdings.pending[MAX_BATCH:]
            try:
                async with asyncio.timeout(timeout_s), self.db.driver() as conn:
                    rows = await self._write(conn, batch)
            except BaseException:
                holdings.pending[:0] = batch
                raise
            holdings.room.set()
            self.on_written()
            WORKER_RUNNING.set(len(holdings.running))
            self._observe(batch, rows)
            if len(rows) < len(batch):
                self.log.info("completions dropped: their leases were lost", count=len(batch) - len(rows))

    async def _write(self, conn: task_store.Executor, batch: list[Completion]) -> list[Mapping[str, Any]]:
        """One statement for the batch. A batch that PostgreSQL refuses for a value one completion
        carries is written in halves, down to that completion, which is dropped: its lease expires
        and the rescuer retries the task. Retried whole, the one bad row would hold back every
        completion written with it, at every retry, while their leases were renewed for ever."""
        try:
            return await task_store.complete(conn, batch, worker_id=self.worker_id)
        except Exception as exc:
            if not is_unstorable_value(exc):
                raise
            if len(batch) == 1:
                self.log.error(
                    "a completion cannot be stored; the task is left to the lease rescuer",
                    task_id=str(batch[0].id),
                    attempt=batch[0].attempt,
                    error=str(exc) or type(exc).__name__,
                )
                return []
        half = len(batch) // 2
        return [*await self._write(conn, batch[:half]), *await self._write(conn, batch[half:])]

    @staticmethod
    def _observe(batch: list[Completion], rows: Sequence[Mapping[str, Any]]) -> None:
        durations = {c.id: (c.finished_at - c.started_at).total_seconds() for c in batch}
        counts: dict[tuple[str, str, str], int] = {}
        for row in rows:
            if row["outcome"] == Outcome.DEFERRED:  # a deferral is not an outcome of the task
                continue
            key = (row["queue"], row["kind"], METRIC_OUTCOME.get(row["status"], row["status"]))
            counts[key] = counts.get(key, 0) + 1
            DURATION(row["queue"], row["kind"]).observe(durations[row["id"]])
        for key, count in counts.items():
            OUTCOMES(*key).inc(count)
