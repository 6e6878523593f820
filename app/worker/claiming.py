"""Claiming: take as many tasks as there is room for, as soon as there is room, in batches.

Three things wake the claim loop: a NOTIFY that tasks became available, a completion written by
this worker (a limited queue may have room again), and the poll interval (LISTEN/NOTIFY is a hint,
never the source of truth). Due scheduled and retryable tasks are staged on their own timer, so
a busy queue never keeps another queue's timers from firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from uuid import UUID

import asyncpg
import structlog

from app.database import is_connection_failure
from app.src.api.engine import flow
from app.src.database import durable as durable_store
from app.src.database import tasks as task_store
from app.src.database.durable import DurableState, Unloadable
from app.src.database.tasks import ClaimedTask
from app.worker.leases import Holdings, LeaseKeeper

if TYPE_CHECKING:
    from app.database import Database


log = structlog.get_logger("taskgate.worker")

# After a failed claim, retry soon: once PostgreSQL is back, work resumes within about this long.
MAX_RETRY_DELAY_S = 1.0
STAGE_TIMEOUT_S = 5.0
STAGE_BATCH = 5000
# What a worker's running durable tasks may hold of loaded state at once (their steps, signals and
# children's results, as SIZE_STATES counts them), across claim rounds: a claim loads only what is
# left of it (the first durable task always, when none is held), and while nothing is left its
# claims pass over durable tasks (CLAIM_* $skip_durable) instead of claiming them to hand them back.
MAX_HELD_STATE_BYTES = durable_store.MAX_CLAIM_STATE_BYTES


class Claimer:
    def __init__(
        self,
        db: Database,
        holdings: Holdings,
        leases: LeaseKeeper,
        *,
        worker_id: UUID,
        concurrency: int,
        batch_size: int,
        poll_s: float,
        queues: list[str] | None,
        start: Callable[[ClaimedTask, float, DurableState | Unloadable | None], None],
    ) -> None:
        self.db = db
        self.holdings = holdings
        self.leases = leases
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.queues = queues
        self.start = start  # hands a claimed task (and when its lease was set) to the executor
        self.stopping = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._limited: tuple[float, list[task_store.LimitedQueue]] = (0.0, [])
        # Queue ids that NOTIFYs named since the limited queues were last checked, and the ids
        # claim_available has served: a named queue in neither may be a limited queue that was
        # just resumed or created, which the cached list cannot show. (A queue served once and
        # limited later is found by the periodic refresh, within a poll interval.)
        self._named: set[int] = set()
        self._unlimited: set[int] = set()
        self._recheck: set[int] = set()
        # When claim_available last came back short (the unlimited queues had nothing more), and
        # how many announcements outside the limited queues had arrived before it was sent: while
        # no other arrives, and for a poll interval at most, a claim asks only the limited queues
        # (one round trip fewer per round). Counting, not a flag: an announcement that lands while
        # that claim is in flight (which could not see its task) must not be forgotten.
        self._unlimited_idle: tuple[float, int] | None = None
        self._announced = 0
        self._queue_failures: dict[int, int] = {}  # limited queue id -> claims failed in a row
        # Limited queues whose last claim came back empty (no work, or no room): asked last in a
        # round until a NOTIFY names them or the list is read again (_turns).
        self._dry: set[int] = set()
        self._turn = 0  # which limited queue goes first among them (_turns)
        self._limited_first = False  # the last round filled up before a limited queue was asked
        # What this worker held of loaded state when a claim last handed durable tasks back for
        # want of budget: its claims pass over durable tasks until it holds less (a task ended),
        # or the tasks handed back would be claimed again at once, round after round.
        self._durable_full_at: int | None = None
        # What the round in flight has claimed so far (each statement commits its own): a round cut
        # off by its deadline hands these back instead of leaving them to their leases.
        self._round: list[ClaimedTask] = []
        self.log = log.bind(worker_id=str(worker_id))

    def wake(self) -> None:
        self._wake.set()

    def notified(self, queue_ids: set[int] | None) -> None:
        """A NOTIFY that tasks became available in these queues (None: anything may have changed)."""
        if queue_ids is None:
            self._limited = (0.0, [])
            self._announced += 1
        else:
            self._named |= queue_ids
            self._dry -= queue_ids
            if not queue_ids <= {queue.id for queue in self._limited[1]}:
                self._announced += 1
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more from now on (idempotent); the loops end at once."""
        self.stopping = True
        self._stopped.set()
        self._wake.set()
        self.holdings.room.set()

    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            held = self.holdings.count()
            free = self.concurrency - held
            if free <= 0 or (held and free < self._claim_threshold()):
                self.holdings.room.clear()
                await self.holdings.room.wait()
                continue
            want = min(free, self.batch_size)
            self._wake.clear()
            sent = time.monotonic()
            try:
                # bounded by the lease it sets: an answer later than that is useless anyway
                async with asyncio.timeout(self.leases.lease_s - self.leases.margin_s):
                    claimed, again, states = await self._claim(want)
            except asyncio.CancelledError:
                if self._round:  # the stop cut this round short (a slow database): hand back its claims
                    await asyncio.shield(self._release(self._round))
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError) and self._round:
                    # a slow database: what the first statements claimed would each lose an attempt
                    # to its lease (and be discarded unrun on its last); handed back, unspent
                    await self._release(self._round)
                self._round = []
                failures += 1
                delay = min(self.poll_s * 2 ** (failures - 1), MAX_RETRY_DELAY_S)
                (self.log.warning if failures == 1 else self.log.debug)(
                    "claim failed", error=str(exc) or type(exc).__name__, retry_in_s=delay
                )
                await self._sleep(delay)
                continue
            if failures:
                self.log.info("claiming again", failed_rounds=failures)
                failures = 0
            if not self.leases.usable(sent):
                # The answer came too late to trust the leases it set; running these now could
                # overlap their rescue. The rescuer retries them.
                if claimed:
                    self.log.warning("claim answered too late; leaving its tasks to the rescuer",
                                     count=len(claimed))  # fmt: skip
                continue
            if self.stopping:
                await self._release(claimed)  # the stop signal arrived while this claim ran
                break
            for task in claimed:
                self.start(task, sent, states.get(task.id))
            if again or len(claimed) >= want:
                continue
            await self._sleep(self.poll_s, wakeable=True)

    async def stage_due(self) -> None:
        """Every poll interval, make due scheduled and retryable tasks available (all queues)."""
        failures = 0
        while not self.stopping:
            try:
                async with asyncio.timeout(STAGE_TIMEOUT_S), self.db.driver() as conn:
                    staged = await task_store.stage_due(conn, limit=STAGE_BATCH)
            except Exception as exc:
                failures += 1
                # said once per streak: an outage repeats it every poll interval
                (self.log.warning if failures == 1 else self.log.debug)(
                    "staging due tasks failed", error=str(exc) or type(exc).__name__
                )
                staged = 0
            else:
                if failures:
                    self.log.info("staging due tasks again", failed_rounds=failures)
                failures = 0
            if staged >= STAGE_BATCH:
                continue  # more are due: keep going
            if staged:
                # its NOTIFY may arrive after the round this wakes has begun: that round must not
                # pass over the unlimited queues as idle
                self._announced += 1
                self._wake.set()
            await self._sleep(self.poll_s)

    async def _release(self, claimed: list[ClaimedTask]) -> None:
        if not claimed:
            return
        try:
            async with asyncio.timeout(STAGE_TIMEOUT_S), self.db.driver() as conn:
                await task_store.release(conn, claimed, worker_id=self.worker_id)
        except Exception as exc:  # their leases expire and the rescuer retries them
            self.log.warning("releasing a late claim failed", error=str(exc) or type(exc).__name__)

    async def _sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        event = self._wake if wakeable else self._stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)

    def _claim_threshold(self) -> int:
        # claim again once a quarter of a batch is free: fewer, fuller round trips
        return max(1, min(self.batch_size, self.concurrency) // 4)

    async def _claim(
        self, want: int
    ) -> tuple[list[ClaimedTask], bool, dict[UUID, DurableState | Unloadable]]:
        """Claim up to `want` tasks; whether to claim again at once (a limited queue gave all it
        was asked for: it may have more room); and the stored state (steps, signals, children) of
        the durable ones."""
        again = False
        states: dict[UUID, DurableState | Unloadable] = {}
        held = self.holdings.state_bytes()
        if self._durable_full_at is not None and held < self._durable_full_at:
            self._durable_full_at = None
        skip_durable = held >= MAX_HELD_STATE_BYTES or self._durable_full_at is not None
        async with self.db.driver() as conn:
            claimed: list[ClaimedTask] = []
            self._round = claimed  # each statement's claims are added to it as they commit
            # Each statement commits what it claims: those tasks are this worker's from then on.
            # A queue whose claim fails is passed over for this round, so neither the tasks
            # claimed before it (left to their leases, they lost an attempt each round, and were
            # discarded without ever running) nor the queues after it pay for it; the round fails
            # only when nothing was claimed (an outage, say).
            failed: Exception | None = None
            unlogged: Exception | None = None  # a failure no limited queue's streak logs
            try:
                limited = await self._limited_queues(conn)
            except Exception as exc:
                # read again next round; the unlimited queues still serve
                failed = unlogged = exc
                limited = []
            idle = self._unlimited_idle
            skip_unlimited = (
                idle is not None and idle[1] == self._announced and time.monotonic() - idle[0] <= self.poll_s
            )
            limited_first = self._limited_first
            order = self._turns(limited, limited_first=limited_first or skip_unlimited)
            for asked, queue in enumerate(order):
                if len(claimed) >= want:
                    # a limited queue that may have work had no say: it goes first in the next round
                    # (and, having gone first in this one, takes turns with the unlimited claim)
                    self._limited_first = not limited_first and any(
                        q is not None and q.id not in self._dry for q in order[asked:]
                    )
                    break
                share = want - len(claimed)
                try:
                    if queue is None:
                        if skip_unlimited:
                            continue
                        announced = self._announced
                        got = await task_store.claim_available(
                            conn,
                            limit=share,
                            lease_s=self.leases.lease_s,
                            worker_id=self.worker_id,
                            queues=self.queues,
                            skip_durable=skip_durable,
                        )
                        self._unlimited.update(task.queue_id for task in got)
                        self._unlimited_idle = (time.monotonic(), announced) if len(got) < share else None
                    else:
                        # A queue with a concurrency limit is claimed half its limit at a time: one
                        # half runs while the other's completions and next claim are written. Asked
                        # for the whole limit at once, the worker and PostgreSQL would take turns,
                        # each idle while the other works.
                        if queue.max_concurrency is not None:
                            share = min(share, max(1, (queue.max_concurrency + 1) // 2))
                        got = await task_store.claim_limited(
                            conn,
                            queue_id=queue.id,
                            keyed=queue.keyed,
                            limit=share,
                            lease_s=self.leases.lease_s,
                            worker_id=self.worker_id,
                            skip_durable=skip_durable,
                        )
                        self._queue_failures.pop(queue.id, None)
                        (self._dry.discard if got else self._dry.add)(queue.id)
                        again = again or len(got) == share
                except Exception as exc:
                    failed = failed or exc
                    if queue is None:
                        unlogged = unlogged or exc
                    else:
                        self._queue_failed(queue.id, exc)
                    if isinstance(exc, asyncpg.PostgresError):
                        continue  # this statement failed; the connection is fine
                    break  # the connection failed: the other queues would wait for it too
                claimed += got
            else:
                self._limited_first = False
            if failed is not None and not claimed:
                raise failed
            if unlogged is not None:  # the tasks claimed start now
                self.log.warning(
                    "part of a claim round failed", error=str(unlogged) or type(unlogged).__name__
                )
            # only tasks that stored steps, signals or children cost this one more statement
            durable = [task for task in claimed if task.durable]
            if durable:
                try:
                    states = await self._load_states(conn, [task.id for task in durable], held=held)
                except Exception as exc:
                    # (A task whose own state cannot be read fails alone, in _load_states.) Started
                    # without their stored steps they would run those again. The others start;
                    # these are handed back when the database was out of reach (the attempt not
                    # spent), else left to their leases.
                    transient = is_connection_failure(exc)
                    self.log.warning(
                        "loading the state of durable tasks failed",
                        count=len(durable),
                        handed_back=transient,
                        error=str(exc) or type(exc).__name__,
                    )
                    if transient:
                        await self._release(durable)
                    claimed = [task for task in claimed if not task.durable]
                    if not claimed:
                        raise
                else:
                    claimed = await self._hand_back_over_budget(conn, claimed, states, held=held)
        self._round = []
        return claimed, again, states

    def _turns(
        self, limited: list[task_store.LimitedQueue], *, limited_first: bool
    ) -> list[task_store.LimitedQueue | None]:
        """The round's order (flow.claim_order), one turn further each round the limited queues go
        first; a limited queue whose last claim came back empty is asked last, until a NOTIFY names
        it or the list is read again: idle limited queues cost no round trip each per round."""
        if limited_first:
            self._turn += 1
        ready = [queue for queue in limited if queue.id not in self._dry]
        dry = [queue for queue in limited if queue.id in self._dry]
        return [*flow.claim_order(ready, limited_first=limited_first, turn=self._turn), *dry]

    async def _hand_back_over_budget(
        self,
        conn: task_store.Executor,
        claimed: list[ClaimedTask],
        states: dict[UUID, DurableState | Unloadable],
        *,
        held: int,
    ) -> list[ClaimedTask]:
        """The claimed tasks less the durable ones whose state the worker's budget left unloaded
        (MAX_HELD_STATE_BYTES): handed back, available again at once and their attempt not counted,
        for another worker, or this one once it holds less (its claims pass over durable tasks
        until then)."""
        over = [task for task in claimed if task.durable and task.id not in states]
        if not over:
            return claimed
        self._durable_full_at = held + sum(
            state.size for state in states.values() if isinstance(state, DurableState)
        )
        try:
            await task_store.release(conn, over, worker_id=self.worker_id)
        except Exception as exc:  # their leases expire and the rescuer retries them
            self.log.warning("handing back tasks over a claim's state budget failed",
                             count=len(over), error=str(exc) or type(exc).__name__)  # fmt: skip
        return [task for task in claimed if not task.durable or task.id in states]

    async def _load_states(
        self, conn: task_store.Executor, task_ids: Sequence[UUID], *, held: int
    ) -> dict[UUID, DurableState | Unloadable]:
        """The stored state of the claimed durable tasks, within what is left of the worker's
        budget (the first always when it holds none; durable_store.load_states: a task whose own
        state cannot be loaded fails alone)."""
        states = await durable_store.load_claimed_states(
            conn, task_ids, budget=MAX_HELD_STATE_BYTES - held, first=held == 0
        )
        for task_id, state in states.items():
            if isinstance(state, Unloadable):
                self.log.warning("a durable task's state cannot be loaded", task_id=str(task_id),
                                 error=state.error)  # fmt: skip
        return states

    def _queue_failed(self, queue_id: int, exc: Exception) -> None:
        # said once per streak: a queue that cannot be claimed fails again at every round
        failures = self._queue_failures[queue_id] = self._queue_failures.get(queue_id, 0) + 1
        (self.log.warning if failures == 1 else self.log.debug)(
            "claiming from a limited queue failed; passed over this round",
            queue_id=queue_id,
            error=str(exc) or type(exc).__name__,
        )

    async def _limited_queues(self, conn: task_store.Executor) -> list[task_store.LimitedQueue]:
        fetched_at, limited = self._limited
        # Re-read early for a queue the list does not know (resuming a limited queue NOTIFYs its
        # id, but the list read while it was paused lacks it): otherwise its tasks would wait up
        # to a poll interval.
        known = {queue.id for queue in limited}
        named = self._named - self._unlimited - known
        again = self._recheck - self._unlimited - known
        self._named, self._recheck = set(), set()
        if named or again or time.monotonic() - fetched_at > self.poll_s:
            limited = await task_store.limited_queues(conn, queues=self.queues)
            self._limited = (time.monotonic(), limited)
            self._dry.clear()  # each is asked first again in its turn (a rate bucket refills unannounced)
            # A NOTIFY can arrive while a round reads the list, before the change it announces is
            # visible to that read: an id it named and the list still lacks is looked up once more.
            self._recheck = named - {queue.id for queue in limited}
        return limited
