"""Remote workers: a client's own processes claim, renew and complete its tasks over HTTPS.

Nothing here decides differently from an in-process worker: the claim is the engine's claim
statement (with the worker's kinds and its client's queues as the filter), leases are renewed by
the same heartbeat, completions are written by the same guarded statement, and a failed attempt
goes through the same failure policy (app/src/api/engine/outcomes.py). What remote work adds is
its identity (a worker id derived from client and worker name), the JSON Schema check of
results, and the long-poll.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import structlog

from app.database import StorageUnavailable
from app.src.api import pages
from app.src.api.engine import durable, flow, remote_kinds
from app.src.api.engine.durable import ChildSpec, CompositionError, SpawnRefused, Suspension, Wait
from app.src.api.engine.outcomes import METRIC_OUTCOME, Outcome, after_failure, clip_error, clip_traceback
from app.src.api.errors import ServiceUnavailable, Unauthorized, Unprocessable
from app.src.api.models.workers import (
    ClaimIn,
    CompleteIn,
    CompletionIn,
    HeartbeatIn,
    SuspendIn,
    WorkerIdentity,
)
from app.src.api.state_machine import Status, transition
from app.src.database import durable as durable_store
from app.src.database import queues as queue_store
from app.src.database import tasks as task_store
from app.src.database import workers as store
from app.src.database.durable import DurableState, Unloadable
from app.src.database.tasks import ClaimedTask, Completion, KindsFilter
from app.src.database.workers import HeldTask, WorkerRow
from app.src.utils.metrics import OUTCOMES, REMOTE_CLAIM_STATE

if TYPE_CHECKING:
    from app.database import Database
    from app.src.api.engine.task_engine import TaskEngine
    from app.src.database.notifications import Notifier

log = structlog.get_logger("taskgate.workers")

_WORKER_NAMESPACE = UUID("5b0f4f64-3c1e-4c55-9a51-7d2f1c7e0a11")
# LISTEN/NOTIFY is a hint: a long-poll re-checks at least this often even when nothing woke it
POLL_S = 1.0
CLAIM_TIMEOUT_S = 5.0
# What the remote claims in flight in one API process may hold of loaded durable state at once
# (steps, signals and children's results, counted as SIZE_STATES counts them): without it, every
# concurrent claim could load its answer's 64 MiB (MAX_CLAIM_STATE_BYTES). A claim takes what its
# states come to (read first) and holds it until its answer is sent (ClaimAnswer.release); finding
# less left, it waits for it (STATE_WAIT_S at most, not past a shutdown), then loads what fits and
# hands the other durable tasks back unspent, available at once for a later claim, here or on
# another replica. The budget is shared fairly among the tenants (clients) whose claims hold or
# wait for it (StateBudget); a tenant alone has all of it.
MAX_LOADED_STATE_BYTES = 4 * durable_store.MAX_CLAIM_STATE_BYTES
STATE_WAIT_S = 5.0


class StateBudget:
    """Bytes of loaded state, taken and given back by the claims of one process (its event loop
    runs them one step at a time: no lock). A waiter's event is its own, made on its own loop.

    Each tenant's claims may hold at most its share: the whole budget divided by the number of
    tenants whose claims hold some of it or wait for it (its own included), so a tenant alone has
    all of it, and a tenant whose workers keep claiming big states (or stop reading their answers)
    no longer takes every byte that is given back while another tenant's claim waits. What a
    tenant held past its share before the other came stays held until its answers are sent (or
    abandoned at their lease): it cannot be taken back from an answer being sent."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total
        self._held: dict[Hashable, int] = {}  # by tenant, those holding some
        self._waiting: dict[Hashable, int] = {}  # by tenant, its claims waiting
        self._waiters: list[asyncio.Event] = []

    def _share(self, tenant: Hashable) -> int:
        """Never less than one task's state may come to (while the budget holds that much): with
        many tenants at once, a task with a big state would otherwise be handed back for ever."""
        others = (self._held.keys() | self._waiting.keys()) - {tenant}
        return max(self.total // (len(others) + 1), min(self.total, durable_store.MAX_STATE_BYTES))

    def _room(self, tenant: Hashable) -> int:
        """What `tenant` may take now: what is left, as far as its share goes."""
        return max(0, min(self.left, self._share(tenant) - self._held.get(tenant, 0)))

    async def take(
        self, most: int, *, tenant: Hashable, wait_s: float, stopping: asyncio.Event | None = None
    ) -> int:
        """`most` bytes (at most the tenant's share) once that much is left for the tenant, or what
        is left for it after `wait_s` or once `stopping` is set: a claim granted a sliver would hand
        its tasks back at once, and be sent again at once, for as long as others held the rest."""

        def enough() -> bool:
            return self._room(tenant) >= min(most, self._share(tenant))

        if not enough():
            freed = asyncio.Event()
            self._waiters.append(freed)
            self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
            self._wake()  # the others' shares changed
            deadline = time.monotonic() + wait_s
            try:
                while not enough() and not (stopping is not None and stopping.is_set()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    await _first(freed, stopping, timeout_s=remaining)
                    freed.clear()
            finally:
                self._waiters.remove(freed)
                self._waiting[tenant] -= 1
                if not self._waiting[tenant]:
                    del self._waiting[tenant]
                    self._wake()
        granted = min(most, self._room(tenant))
        if granted:
            self.left -= granted
            self._held[tenant] = self._held.get(tenant, 0) + granted
        return granted

    def give(self, amount: int, *, tenant: Hashable) -> None:
        if amount <= 0:
            return
        held = self._held.get(tenant, 0) - amount
        if held > 0:
            self._held[tenant] = held
        else:
            self._held.pop(tenant, None)
        self.left = min(self.total, self.left + amount)
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()


LOADED_STATE = StateBudget(MAX_LOADED_STATE_BYTES)
REMOTE_CLAIM_STATE.set_function(lambda: LOADED_STATE.total - LOADED_STATE.left)


def remote_worker_id(client_id: UUID, name: str) -> UUID:
    """A remote worker's id: the same name of the same client is the same worker."""
    return uuid.uuid5(_WORKER_NAMESPACE, f"{client_id}/{name}")


# What GET /api/workers shows needs no write per request: a worker's row is refreshed at most
# every SEEN_EVERY_S per process (its claims and heartbeats come far more often), and `running`
# is what its latest recorded heartbeat held.
SEEN_EVERY_S = 5.0
_seen_at: dict[UUID, float] = {}
_limited: dict[tuple[UUID, tuple[str, ...] | None], tuple[float, list[task_store.LimitedQueue]]] = {}
# Claims of these queues whose limited queues go first next (the last filled up before asking
# them), and which of them goes first (_claim_once)
_limited_first: dict[tuple[UUID, tuple[str, ...] | None], bool] = {}
_limited_turn: dict[tuple[UUID, tuple[str, ...] | None], int] = {}


def _due_for_seen(worker_id: UUID, *, heartbeat: bool = False) -> bool:
    now = time.monotonic()
    if not heartbeat and now - _seen_at.get(worker_id, -SEEN_EVERY_S) < SEEN_EVERY_S:
        return False
    if len(_seen_at) > 10_000:
        _seen_at.clear()
    _seen_at[worker_id] = now
    return True


async def _limited_queues(
    conn: task_store.Executor, client_id: UUID, queues: list[str] | None
) -> list[task_store.LimitedQueue]:
    """This client's queues with a concurrency or rate limit, re-read at most every POLL_S."""
    key = (client_id, None if queues is None else tuple(queues))
    hit = _limited.get(key)
    if hit is not None and time.monotonic() - hit[0] < POLL_S:
        return hit[1]
    limited = await task_store.limited_queues(conn, queues=queues, client_id=client_id)
    if len(_limited) > 10_000:
        _limited.clear()
    _limited[key] = (time.monotonic(), limited)
    return limited


@dataclass(frozen=True, slots=True)
class Claimed:
    task: ClaimedTask
    lease_expires_at: datetime
    traceparent: str | None = None  # handed to the remote worker, which continues the trace
    state: DurableState | None = None  # steps, signals and children of a durable task


class ClaimAnswer:
    """What one claim hands out, and the bytes of the process's LOADED_STATE its loaded state holds
    until `release`: once its answer is sent, or known lost (then its tasks are handed back).
    Also an async context manager over the claimed tasks that releases them as delivered."""

    def __init__(
        self, db: Database, client_id: UUID, worker_id: UUID, claimed: list[Claimed], held: int
    ) -> None:
        self.claimed = claimed
        self.held = held
        self._db = db
        self._client_id = client_id
        self._worker_id = worker_id
        self._released = False

    def release(self, *, delivered: bool = True) -> None:
        """Give back what the answer held (once). Not delivered: no worker can have read it, so
        its tasks are available again at once, their attempt not counted."""
        if self._released:
            return
        self._released = True
        LOADED_STATE.give(self.held, tenant=self._client_id)
        if not delivered:
            _hand_back(self._db, self._worker_id, [item.task for item in self.claimed])

    async def __aenter__(self) -> list[Claimed]:
        return self.claimed

    async def __aexit__(self, *exc: object) -> None:
        self.release()


async def claim(
    db: Database,
    notifier: Notifier,
    *,
    client_id: UUID,
    data: ClaimIn,
    lease_s: float,
    stopping: asyncio.Event | None = None,
    allowed: Callable[[], Awaitable[bool]] | None = None,
) -> ClaimAnswer:
    """Claim up to `data.max` tasks of the named remote kinds, waiting up to `data.wait_s` (or
    until `stopping` is set: the wait ends at once). The durable tasks' loaded state counts
    against the process's LOADED_STATE until the answer is released. After a wait, a claim
    round runs only if `allowed()` still says yes (the key not revoked meanwhile, its client
    not disabled): else Unauthorized, and nothing is claimed."""
    worker_id = remote_worker_id(client_id, data.worker.name)
    claimed, held = await _claim(
        db,
        notifier,
        client_id=client_id,
        worker_id=worker_id,
        data=data,
        lease_s=lease_s,
        stopping=stopping,
        allowed=allowed,
    )
    return ClaimAnswer(db, client_id, worker_id, claimed, held)


async def _claim(
    db: Database,
    notifier: Notifier,
    *,
    client_id: UUID,
    worker_id: UUID,
    data: ClaimIn,
    lease_s: float,
    stopping: asyncio.Event | None,
    allowed: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[list[Claimed], int]:
    """The claimed tasks, and the bytes of loaded state they hold of LOADED_STATE."""
    known = await remote_kinds.lookup(db, client_id=client_id, names=data.kinds)
    unknown = [name for name in data.kinds if name not in known]
    if unknown:
        positions = [i for i, kind in enumerate(data.kinds) if kind in unknown]
        not_remote = {"message": "not a remote kind of this client", "type": "unknown_kind"}
        raise Unprocessable(
            "A remote worker claims only remote kinds its client registered (PUT /api/catalog/kinds/{name}).",
            errors=[{"field": f"body.kinds.{i}", **not_remote} for i in positions],
        )
    kinds = KindsFilter(client_id=client_id, kinds=sorted(set(data.kinds)))
    if _due_for_seen(worker_id):
        try:
            async with db.driver() as conn:
                await store.seen(
                    conn,
                    worker_id=worker_id,
                    client_id=client_id,
                    name=data.worker.name,
                    version=data.worker.version,
                    remote=True,
                    kinds=kinds.kinds,
                    queues=data.queues,
                )
        except BaseException:
            # not written: the next claim writes it (before claiming), as completions of a worker
            # that names no worker find its tasks' holder by this row (store.held_tasks)
            _seen_at.pop(worker_id, None)
            raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + data.wait_s
    with notifier.watch_available() as woken:
        while True:
            woken.clear()
            # on its own timer, before the claim (which then sees what it made available), and
            # whatever the claims find: staged only when a claim came back empty, due retries
            # and delayed tasks waited for a whole backlog to drain
            staged = await _stage_due(db)
            claiming = asyncio.ensure_future(
                _claim_once(
                    db, kinds=kinds, queues=data.queues, want=data.max, lease_s=lease_s, worker_id=worker_id
                )
            )
            try:
                # shielded: a request cancelled (its client gone) while the statement runs must
                # still learn what it claimed, to hand it back
                claimed = await asyncio.shield(claiming)
            except asyncio.CancelledError:
                _hand_back(db, worker_id, claiming)
                raise
            remaining = deadline - loop.time()
            if claimed or remaining <= 0 or (stopping is not None and stopping.is_set()):
                break
            if staged:
                continue  # what was staged may belong to others; the timer holds the next staging
            await _first(woken, stopping, timeout_s=min(remaining, POLL_S))
            if allowed is not None and not await allowed():
                # revoked while it waited (in any process): what comes now is not for this key
                raise Unauthorized(
                    "This API key was revoked, or its client disabled, while the claim waited.",
                    headers={"WWW-Authenticate": 'Bearer realm="taskgate"'},
                )
    if not claimed:
        return [], 0
    # One primary-key read per claim round (not per task), outside the claim statement, and one
    # more statement for the tasks that stored steps, signals or children, on one connection.
    # The tasks are claimed: without their trace contexts they are handed out regardless, but a
    # durable task cannot run without its stored state (the claim is handed back: _hand_back).
    # A task whose own state cannot be loaded fails its attempt alone (durable_store.load_states),
    # as with an in-process worker; the others are handed out.
    contexts: dict[UUID, str] = {}
    states: dict[UUID, DurableState | Unloadable] = {}
    durable = [t.id for t in claimed if t.durable]
    granted = held = 0
    try:
        try:
            async with db.driver() as conn:
                contexts = await task_store.traceparents(conn, [t.id for t in claimed])
                # what each state comes to, as far as one answer's bound goes (the first always)
                sizes = await durable_store.claimed_sizes(conn, durable) if durable else {}
            if durable:
                # the process's budget is taken for what will be loaded, outside the connection:
                # a claim waiting for it holds none of the pool
                need = sum(size for size in sizes.values() if durable_store.loadable(size))
                granted = await LOADED_STATE.take(
                    need, tenant=client_id, wait_s=STATE_WAIT_S, stopping=stopping
                )
                loading, held = _within(durable, sizes, granted)
                LOADED_STATE.give(granted - held, tenant=client_id)
                granted = 0
                async with db.driver() as conn:
                    states = await durable_store.load_sized_states(conn, loading, sizes)
                    unloadable = [(t, s) for t in claimed if isinstance(s := states.get(t.id), Unloadable)]
                    if unloadable:
                        await _fail_unloadable(conn, worker_id, unloadable)
                    # past the answer's bound (MAX_CLAIM_STATE_BYTES) or what the process had left:
                    # handed back, their attempt not counted, for a later claim
                    over = [t for t in claimed if t.durable and t.id not in states]
                    if over:
                        await task_store.release(conn, over, worker_id=worker_id)
        except StorageUnavailable:
            if durable:
                raise
    except asyncio.CancelledError:
        LOADED_STATE.give(granted + held, tenant=client_id)
        _hand_back(db, worker_id, claimed)
        raise
    except BaseException:
        LOADED_STATE.give(granted + held, tenant=client_id)
        await asyncio.shield(_hand_back(db, worker_id, claimed))
        raise
    # the claim set lease_expires_at = started_at + lease_s (one now() in one statement)
    answer = [
        Claimed(t, t.started_at + timedelta(seconds=lease_s), contexts.get(t.id), state)
        for t in claimed
        if not isinstance(state := states.get(t.id), Unloadable) and (state is not None or not t.durable)
    ]
    return answer, held


def _within(durable: list[UUID], sizes: dict[UUID, int], granted: int) -> tuple[list[UUID], int]:
    """The sized tasks to load, in claim order, as far as `granted` bytes go, and their bytes; the
    ones past MAX_STATE_BYTES cost nothing (they are never loaded, only failed)."""
    loading: list[UUID] = []
    total = 0
    for task_id in durable:
        size = sizes.get(task_id)
        if size is None:
            continue  # past the answer's bound
        if not durable_store.loadable(size):
            loading.append(task_id)
        elif total + size <= granted:
            loading.append(task_id)
            total += size
    return loading, total


async def _fail_unloadable(conn: Any, worker_id: UUID, tasks: list[tuple[ClaimedTask, Unloadable]]) -> None:
    """End the attempts of claimed tasks whose stored state cannot be loaded (each with the error
    loading it gave): failed, retried by their queue's policy, or for good when it is past what a
    task may load (the in-process worker fails them the same way, app/worker/executing.py). Not
    handed out: without their steps they would run those again."""
    queue_ids = sorted({task.queue_id for task, _ in tasks})
    queues = {q.id: q for q in await queue_store.get_by_ids(conn, queue_ids)}
    now = datetime.now(UTC)
    completions = []
    for task, unloadable in tasks:
        queue = queues.get(task.queue_id)
        decided = after_failure(
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            queue=queue,  # type: ignore[arg-type]  # None: permanent below
            permanent=queue is None or unloadable.permanent,
            retry_base=task.retry_base,
        )
        transition(Status.RUNNING, decided.status)
        completions.append(
            Completion(
                id=task.id,
                attempt=task.attempt,
                status=decided.status,
                outcome=Outcome.FAILED,
                started_at=task.started_at,
                finished_at=max(now, task.started_at),
                error=clip_error(f"its stored state could not be loaded: {unloadable.error}"),
                retry_in_s=decided.retry_in_s,
            )
        )
        log.warning("a durable task's state cannot be loaded", task_id=str(task.id), error=unloadable.error)
    for row in await task_store.complete(conn, completions, worker_id=worker_id):
        OUTCOMES(row["queue"], row["kind"], METRIC_OUTCOME.get(row["status"], row["status"])).inc()


_handing_back: set[asyncio.Task[None]] = set()


def _hand_back(
    db: Database, worker_id: UUID, claimed: list[ClaimedTask] | asyncio.Future[list[ClaimedTask]]
) -> asyncio.Task[None]:
    """Release tasks this request claimed but cannot answer with (it failed or was cancelled after
    the claim committed): available again at once, the attempt not counted (no worker ever saw
    it), as the in-process claimer releases a claim that a stop overtook, instead of sitting until
    their leases expire and spending an attempt. On a task of its own, so that a cancelled request
    still does it; bounded; if it fails, the leases decide as before."""

    async def release() -> None:
        try:
            tasks = claimed if isinstance(claimed, list) else await claimed
        except Exception:
            return  # the claim failed: it claimed nothing (app/src/api/workers._claim_once)
        if not tasks:
            return
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S), db.driver() as conn:
                released = await task_store.release(conn, tasks, worker_id=worker_id)
            log.info("claimed tasks whose answer was lost released", count=len(released))
        except Exception as exc:
            log.warning("claimed tasks whose answer was lost could not be released; their leases expire",
                        count=len(tasks), error=str(exc) or type(exc).__name__)  # fmt: skip

    task = asyncio.create_task(release())
    _handing_back.add(task)
    task.add_done_callback(_handing_back.discard)
    return task


async def _first(woken: asyncio.Event, stopping: asyncio.Event | None, *, timeout_s: float) -> None:
    """Wait until either event is set, at most `timeout_s`."""
    waits = [asyncio.ensure_future(event.wait()) for event in (woken, stopping) if event is not None]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _claim_once(
    db: Database, *, kinds: KindsFilter, queues: list[str] | None, want: int, lease_s: float, worker_id: UUID
) -> list[ClaimedTask]:
    """The in-process claimer's round (app/worker/claiming.py), with the remote worker's filter.

    As there, a limited queue whose claim fails is passed over: the tasks already claimed (each
    statement commits its own) are handed out, not left to their leases; the request fails only
    when nothing was claimed. So with a round that outlasts CLAIM_TIMEOUT_S (a slow database, each
    statement within its own deadline): what it claimed is handed out, and a round that claimed
    nothing is StorageUnavailable (503 with Retry-After)."""
    claimed: list[ClaimedTask] = []
    turn_key = (kinds.client_id, None if queues is None else tuple(queues))
    try:
        async with asyncio.timeout(CLAIM_TIMEOUT_S), db.driver() as conn:
            failed: Exception | None = None
            try:
                limited = await _limited_queues(conn, kinds.client_id, queues)
            except Exception as exc:
                failed, limited = exc, []  # the unlimited queues still serve
            # As in-process: the unlimited claim goes first, unless the last claim of these queues
            # filled up before its limited queues were asked (then they go first, taking turns),
            # or a busy unlimited queue would hold them up for as long as its backlog lasts.
            limited_first = _limited_first.pop(turn_key, False)
            turn = 0
            if limited_first and limited:
                turn = _limited_turn[turn_key] = (_limited_turn.get(turn_key, -1) + 1) % len(limited)
            order = flow.claim_order(limited, limited_first=limited_first, turn=turn)
            for asked, queue in enumerate(order):
                if len(claimed) >= want:
                    if not limited_first and any(q is not None for q in order[asked:]):
                        if len(_limited_first) > 10_000:
                            _limited_first.clear()
                            _limited_turn.clear()
                        _limited_first[turn_key] = True
                    break
                try:
                    if queue is None:
                        claimed += await task_store.claim_available(
                            conn, limit=want - len(claimed), lease_s=lease_s, worker_id=worker_id,
                            queues=queues, kinds=kinds,
                        )  # fmt: skip
                    else:
                        claimed += await task_store.claim_limited(
                            conn, queue_id=queue.id, keyed=queue.keyed, limit=want - len(claimed),
                            lease_s=lease_s, worker_id=worker_id, kinds=kinds,
                        )  # fmt: skip
                except Exception as exc:
                    failed = failed or exc
                    if queue is not None:
                        log.warning("claiming from a limited queue failed; passed over",
                                    queue_id=queue.id, error=str(exc) or type(exc).__name__)  # fmt: skip
                    if not isinstance(exc, asyncpg.PostgresError):
                        break  # the connection failed, not this queue's statement
            if failed is not None and not claimed:
                raise failed
    except TimeoutError:
        log.warning("a claim round ran out of time", deadline_s=CLAIM_TIMEOUT_S, claimed=len(claimed))
        if not claimed:
            raise StorageUnavailable(
                f"the database did not answer a claim round within {CLAIM_TIMEOUT_S:g} s"
            ) from None
    return claimed


_staged_at = 0.0


async def _stage_due(db: Database) -> int:
    """Due scheduled and retryable tasks become available, at most once per POLL_S per process:
    in-process workers do it too, but a deployment whose API replicas serve only remote workers
    must not leave their retries waiting. A claim does not depend on it: a failure is logged (the
    next one is due a POLL_S later)."""
    global _staged_at
    now = asyncio.get_running_loop().time()
    if now - _staged_at < POLL_S:
        return 0
    _staged_at = now
    try:
        async with asyncio.timeout(CLAIM_TIMEOUT_S), db.driver() as conn:
            return await task_store.stage_due(conn)
    except Exception as exc:
        log.warning("staging due tasks failed", error=str(exc) or type(exc).__name__)
        return 0


@dataclass(frozen=True, slots=True)
class Lease:
    id: UUID
    lease_expires_at: datetime
    cancel_requested: bool


async def heartbeat(
    db: Database, *, client_id: UUID, data: HeartbeatIn, lease_s: float
) -> tuple[list[Lease], list[UUID]]:
    """Renew the leases still held; (renewed, lost). Progress is stored for renewed tasks only."""
    if not data.task_ids:
        return [], []
    renewed: list[Any] = []
    given = data.progress or {}
    reports: list[tuple[UUID, int, UUID, dict[str, Any]]] = []
    async with db.driver() as conn:
        for worker_id, ids in (await _by_worker(conn, client_id, data.task_ids, data.worker)).items():
            rows = await task_store.heartbeat_rows(conn, task_ids=ids, lease_s=lease_s, worker_id=worker_id)
            renewed += rows
            reports += [
                (row["id"], row["attempts"], worker_id, given[row["id"]])
                for row in rows
                if row["id"] in given
            ]
        await task_store.set_progress_many(conn, reports)
        if data.worker is not None and _due_for_seen(
            remote_worker_id(client_id, data.worker.name), heartbeat=True
        ):
            await store.seen(
                conn,
                worker_id=remote_worker_id(client_id, data.worker.name),
                client_id=client_id,
                name=data.worker.name,
                version=data.worker.version,
                remote=True,
                running=len(renewed),
            )
    alive = {row["id"] for row in renewed}
    leases = [Lease(r["id"], r["lease_expires_at"], r["cancel_requested"]) for r in renewed]
    return leases, [task_id for task_id in dict.fromkeys(data.task_ids) if task_id not in alive]


async def _by_worker(
    conn: task_store.Executor, client_id: UUID, task_ids: list[UUID], worker: WorkerIdentity | None
) -> dict[UUID, list[UUID]]:
    """The tasks grouped by the worker id their guard must name. A named worker guards them with
    its own id; otherwise each running task's current holder (still this client's, and a remote
    worker: never an in-process one) stands in, and the attempt number (completion) or the
    running status (heartbeat) is the guard."""
    unique = list(dict.fromkeys(task_ids))
    if worker is not None:
        return {remote_worker_id(client_id, worker.name): unique}
    grouped: dict[UUID, list[UUID]] = {}
    for task in (await store.held_tasks(conn, client_id=client_id, task_ids=unique)).values():
        if task.worker_id is not None and task.remote_holder and task.status == Status.RUNNING:
            grouped.setdefault(task.worker_id, []).append(task.id)
    return grouped


@dataclass(frozen=True, slots=True)
class Answer:
    id: UUID
    accepted: bool
    status: str | None


# A complete request's whole processing, answered 503 + Retry-After past it. Its work grows with
# what it carries (a transaction per suspended item, up to 1,000, besides the batch statements), and
# each statement is bounded on its own (DB_COMMAND_TIMEOUT_S) but their sum was not: a slow (not
# stalled) database held one request, its connection and its worker's completions for minutes.
# Cutting a request part-way is safe because no completion can be half-applied: each suspension is
# one transaction (durable.suspend: steps, children, wait record and status, or nothing) and each
# batch of the others one statement, each guarded by status, attempt and worker. The client sends the
# same request again (the SDK does, after Retry-After): what was written answers `accepted: false`
# with the task's new status (its attempt is no longer running) and changes nothing; the rest is
# written then. Well under the SDK's 30 s request timeout; a healthy database writes 1,000
# suspensions in a few seconds.
COMPLETE_DEADLINE_S = 10.0


async def complete(engine: TaskEngine, *, client_id: UUID, data: CompleteIn) -> list[Answer]:
    """Finish attempts in one guarded statement per worker; a stale or duplicate one is refused.
    Within COMPLETE_DEADLINE_S, else ServiceUnavailable (what was written stays written)."""
    try:
        async with asyncio.timeout(COMPLETE_DEADLINE_S):
            return await _complete(engine, client_id=client_id, data=data)
    except TimeoutError:
        log.warning(
            "a completion request ran out of time", items=len(data.items), deadline_s=COMPLETE_DEADLINE_S
        )
        raise ServiceUnavailable(
            f"The completions were not all written within {COMPLETE_DEADLINE_S:g} s (the database is slow); "
            "send the same request again: those already written answer accepted false.",
            retry_after=1,
        ) from None


async def _complete(engine: TaskEngine, *, client_id: UUID, data: CompleteIn) -> list[Answer]:
    db = engine.db
    ids = list(dict.fromkeys(item.id for item in data.items))
    async with db.driver() as conn:
        held = await store.held_tasks(conn, client_id=client_id, task_ids=ids)
    named = None if data.worker is None else remote_worker_id(client_id, data.worker.name)
    kinds = await remote_kinds.lookup(db, client_id=client_id, names={t.kind for t in held.values()})
    backoffs = await engine.queues.by_ids({t.queue_id for t in held.values()})
    now = datetime.now(UTC)
    problems = _result_problems(data, held, named, kinds)
    groups: dict[UUID, list[Completion]] = {}
    seen_ids: set[UUID] = set()
    written: dict[UUID, str] = {}
    for item in data.items:
        task = held.get(item.id)
        if task is None or item.id in seen_ids or not _current(task, item, named):
            continue
        seen_ids.add(item.id)
        if item.outcome == "suspended" and task.worker_id is not None:
            queue = backoffs.get(task.queue_id)
            try:
                status = await durable.suspend(
                    engine,
                    task_id=task.id,
                    client_id=client_id,
                    attempt=item.attempt,
                    worker_id=task.worker_id,
                    suspension=_suspension(item.suspend, default_queue=queue.name if queue else "default"),
                )
            except CompositionError as exc:
                discarded = _finished(task, item, Status.DISCARDED, Outcome.FAILED,
                                      task.started_at or now, now, error=str(exc))  # fmt: skip
                groups.setdefault(task.worker_id, []).append(discarded)
                continue
            except SpawnRefused as exc:  # a failed attempt, retried by the queue's policy
                refused = item.model_copy(update={"outcome": "failed", "error": str(exc),
                                                  "retry_after_s": exc.retry_after_s})  # fmt: skip
                retried = _completion(task, refused, None, queue, now)
                if retried is not None:
                    groups.setdefault(task.worker_id, []).append(retried)
                continue
            if status is not None:
                written[task.id] = status
            continue
        completion = _completion(task, item, problems.get(item.id), backoffs.get(task.queue_id), now)
        if completion is not None and task.worker_id is not None:  # _current: it has a holder
            groups.setdefault(task.worker_id, []).append(completion)
    async with db.driver() as conn:
        for worker_id, batch in groups.items():
            for row in await task_store.complete(conn, batch, worker_id=worker_id):
                written[row["id"]] = row["status"]
                OUTCOMES(row["queue"], row["kind"], METRIC_OUTCOME.get(row["status"], row["status"])).inc()
    answers = []
    for item in data.items:
        if item.id in written:
            answers.append(Answer(item.id, True, written.pop(item.id)))
        else:
            task = held.get(item.id)
            answers.append(Answer(item.id, False, None if task is None else task.status))
    return answers


def _result_problems(
    data: CompleteIn, held: dict[UUID, HeldTask], named: UUID | None, kinds: dict[str, store.RemoteKindRow]
) -> dict[UUID, str]:
    """Why each completed result cannot complete its task, checked before anything is written and
    within one budget for the whole request: 1,000 results that each cost just under a check's own
    budget held the event loop for minutes. A request past it is refused whole (422, nothing
    written; the SDK splits the batch): failing the attempts of results that were fine, for what
    the others cost, would be wrong."""
    problems: dict[UUID, str] = {}
    taken: set[UUID] = set()  # as _complete: of an id's current items, the first is the one taken
    try:
        with remote_kinds.checks_within():
            for item in data.items:
                task = held.get(item.id)
                if task is None or item.id in taken or not _current(task, item, named):
                    continue
                taken.add(item.id)
                if item.outcome != "completed":
                    continue
                problem = remote_kinds.result_problem(kinds.get(task.kind), item.result)
                if problem is not None:
                    problems[item.id] = problem
    except remote_kinds.ChecksOverBudget as exc:
        raise Unprocessable(
            f"Checking these results against their kinds' result schemas takes too long: {exc}",
            errors=[{"field": "body.items", "message": str(exc), "type": "over_budget"}],
        ) from None
    return problems


def _current(task: HeldTask, item: CompletionIn, named: UUID | None) -> bool:
    """The attempt named is the one running now (the statement checks it again, atomically), held
    by the worker named or, when none is, by a remote worker of this client: an attempt an
    in-process worker runs is never ended (or suspended, and so run again at once) from here."""
    if task.status != Status.RUNNING or task.attempt != item.attempt or task.worker_id is None:
        return False
    return task.remote_holder if named is None else task.worker_id == named


def _completion(
    task: HeldTask, item: CompletionIn, problem: str | None, queue: Any, now: datetime
) -> Completion | None:
    """What the worker's report means for the task (`problem`: why its result cannot complete it,
    see _result_problems); None for what this server cannot do yet."""
    started_at = task.started_at or now
    error = item.error
    # the remote worker's traceback goes to the attempt record, bounded as an in-process one
    trace = clip_traceback(item.traceback) if item.traceback else None

    def failed(message: str, *, retry_after_s: float | None = None, permanent: bool = False) -> Completion:
        if queue is None:  # the queue was deleted meanwhile: nothing left to retry into
            permanent = True
        decided = after_failure(
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            queue=queue,
            retry_after_s=retry_after_s,
            permanent=permanent,
            retry_base=task.retry_base,
        )
        return _finished(task, item, decided.status, Outcome.FAILED, started_at, now,
                         error=message, retry_in_s=decided.retry_in_s, traceback=trace)  # fmt: skip

    if item.outcome == "completed":
        if problem is not None:
            return failed(problem)
        return _finished(task, item, Status.COMPLETED, Outcome.COMPLETED, started_at, now, result=item.result)
    if item.outcome == "failed":
        return failed(error or "failed", retry_after_s=item.retry_after_s)
    if item.outcome == "permanent_failure":
        return failed(error or "permanent failure", permanent=True)
    if item.outcome == "cancelled":
        return _finished(task, item, Status.CANCELLED, Outcome.CANCELLED, started_at, now,
                         error=error or "cancelled")  # fmt: skip
    return None  # "suspended" is written by durable.suspend (complete)


def _suspension(data: SuspendIn | None, *, default_queue: str) -> Suspension:
    """A remote worker's suspension, as the engine writes it for in-process workers too."""
    if data is None:
        return Suspension()
    wait = None if data.wait is None else Wait(data.wait.type, data.wait.name, data.wait.seconds)
    spawn = [
        ChildSpec(key=c.key, kind=c.kind, payload=c.payload, queue=c.queue or default_queue,
                  priority=c.priority, max_attempts=c.max_attempts)
        for c in data.spawn
    ]  # fmt: skip
    return Suspension(steps=data.steps, spawn=spawn, wait=wait)


def _finished(
    task: HeldTask,
    item: CompletionIn,
    status: Status,
    outcome: Outcome,
    started_at: datetime,
    now: datetime,
    *,
    result: Any = None,
    error: str | None = None,
    retry_in_s: float | None = None,
    traceback: str | None = None,
) -> Completion:
    transition(Status.RUNNING, status)
    return Completion(
        id=task.id,
        attempt=item.attempt,
        status=status,
        outcome=outcome,
        started_at=started_at,
        finished_at=max(now, started_at),
        result=result,
        error=None if error is None else clip_error(error),
        retry_in_s=retry_in_s,
        traceback=traceback,
    )


async def list_workers(
    db: Database, *, client_id: UUID, limit: int, cursor: str | None
) -> tuple[list[WorkerRow], str | None]:
    """A page of the workers seen lately in id order, and the next page's cursor."""
    after = None
    if cursor:
        try:
            after = UUID(str(pages.decode(cursor, str)[0]))
        except ValueError:
            raise pages.invalid_cursor() from None
    async with db.driver() as conn:
        found = await store.list_workers(conn, client_id=client_id, after=after, limit=limit + 1)
    return pages.page(found, limit, lambda w: (str(w.id),))
