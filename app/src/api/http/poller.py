"""The asynchronous request-reply poller: the scheduler's `poll_waiting_http` job.

A `waiting` http task carries its state (HttpWaitState: status URL, deadline) in PostgreSQL, so a
restart loses nothing: whichever replica is elected next claims the due tasks (SKIP LOCKED plus a
lease on run_at, app/src/database/http.py) and polls them.

What a poll means:
- the status URL answers 202: still running; poll again after Retry-After (or a growing interval),
  at the latest at the deadline;
- it redirects (303, or another redirect with Location): the result is there; fetch it, and judge
  that answer like a synchronous one: success completes, 408/429/5xx makes the task retryable
  (it runs again from the original request, as after a synchronous 5xx), other answers discard;
- it answers anything else: that is the final answer, judged the same way, except that 408, 429
  and 5xx from the status URL, and network errors on either URL, are failures to *poll*, not
  answers: the task keeps waiting and is polled again (with backoff) until its deadline;
- the deadline passes without a final answer: discarded.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError
from yarl import URL

from app.src.api.engine.outcomes import Outcome, after_failure, clip_error
from app.src.api.http.client import CREDENTIAL_HEADERS, HttpResponse, OutboundHttp
from app.src.api.http.delivery import (
    Classified,
    classify,
    exchange,
    judge_status,
    resolve_location,
    signer_for,
    signing_secrets,
    to_result,
)
from app.src.api.kinds import REGISTRY, Deferred, PermanentError, RetryLater
from app.src.api.models.http import HttpPayload, HttpWaitState
from app.src.api.state_machine import Status, sources, transition
from app.src.database import http as store
from app.src.database.http import WaitingTask
from app.src.utils.metrics import OUTCOMES

if TYPE_CHECKING:
    from app.database import Database
    from app.src.api.engine.caches import QueueCache

log = structlog.get_logger("taskgate.http.poller")

KIND = "http"
POLL_BATCH = 200  # due tasks claimed per statement
POLL_CONCURRENCY = 100  # polls in flight per process (HTTP_MAX_CONNECTIONS' default)
POLL_RUN_S = 5.0  # a run returns after this; polls still going go on beside the next runs
CLAIM_MARGIN_S = 30.0  # a claim's lease: two requests' timeouts plus this
FIRST_POLL_S = 1.0
MAX_POLL_INTERVAL_S = 60.0


class PollResult(StrEnum):
    """What one poll did, as the scheduler's job report counts it."""

    COMPLETED = "completed"
    RETRYABLE = "retryable"  # the final answer was a failure worth another attempt
    DISCARDED = "discarded"
    PENDING = "pending"  # not done yet: polled again later
    POLL_FAILED = "poll_failed"  # the status URL could not be read: polled again later
    ERROR = "error"  # a bug; the claim's lease runs out and the task is polled again


class StatusPoller:
    """The `poll_waiting_http` job of one process: its runs and the polls they started.

    A run claims only as many due tasks as the process has free poll slots and returns within
    POLL_RUN_S; a poll still going then (a status URL that answers no sooner than its task's
    timeout_s, up to 900 s, twice: status and result) goes on beside the later runs, holding its
    slot. A run that waited for every poll it started held up the polls of every other waiting task
    in the cluster (the job is elected: one run at a time) until the slowest timed out, and the
    job, without a success for that long, turned every replica unready. A destination holds at
    most HTTP_HOST_MAX_CONCURRENCY slots (its other polls are deferred by its permits).
    """

    def __init__(
        self,
        db: Database,
        queue_settings: QueueCache,
        *,
        concurrency: int = POLL_CONCURRENCY,
        run_s: float = POLL_RUN_S,
    ) -> None:
        self.db = db
        self.queue_settings = queue_settings
        self.concurrency = concurrency
        self.run_s = run_s
        self._in_flight: set[asyncio.Task[PollResult]] = set()
        self._claiming = True

    def stop_claiming(self) -> None:
        """Shutdown: runs claim nothing more (the polls going on are the scheduler's to end)."""
        self._claiming = False

    def in_flight(self) -> list[asyncio.Task[PollResult]]:
        """Polls still going (the scheduler's shutdown waits for them, then cancels them: a
        cancelled poll hands its task back at once)."""
        return [task for task in self._in_flight if not task.done()]

    async def run(self, http: OutboundHttp | None) -> dict[str, int] | None:
        """Poll due waiting http tasks for up to POLL_RUN_S; counts per outcome of the polls that
        ended within it (None when idle)."""
        if http is None:
            return None
        kind = REGISTRY.get(KIND)
        kinds = [kind.name, *kind.aliases] if kind is not None else [KIND]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.run_s
        counts: Counter[str] = Counter()
        while self._claiming and (room := min(POLL_BATCH, self.concurrency - len(self._in_flight))) > 0:
            async with self.db.driver() as conn:
                due = await store.claim_waiting(conn, kinds=kinds, limit=room, margin_s=CLAIM_MARGIN_S)
            if not due:
                break
            started = [self._start(http, task) for task in due]
            ended, going = await asyncio.wait(started, timeout=max(0.0, deadline - loop.time()))
            counts.update(str(task.result()) for task in ended if not task.cancelled())
            if going or len(due) < room or loop.time() >= deadline:
                break
        in_flight = len(self.in_flight())
        if in_flight:
            counts["in_flight"] = in_flight
        return dict(counts) or None

    def _start(self, http: OutboundHttp, task: WaitingTask) -> asyncio.Task[PollResult]:
        poll = asyncio.create_task(self._poll(http, task), name=f"poll {task.id}")
        self._in_flight.add(poll)
        poll.add_done_callback(self._in_flight.discard)
        return poll

    async def _poll(self, http: OutboundHttp, task: WaitingTask) -> PollResult:
        try:
            return await poll_one(self.db, http, task, self.queue_settings)
        except asyncio.CancelledError:
            # shutdown: hand the claim back, so the next replica polls at once, not after the lease
            await asyncio.shield(_hand_back(self.db, task))
            raise
        except Exception as exc:
            # the claim's lease runs out and the task is polled again: nothing is lost
            log.exception("polling a waiting task failed", task_id=str(task.id))
            return await _give_up_if_late(self.db, task, exc)


async def poll_one(
    db: Database, http: OutboundHttp, task: WaitingTask, queue_settings: QueueCache
) -> PollResult:
    now = datetime.now(UTC)
    try:
        payload = HttpPayload.model_validate(task.payload, context=http.payload_context)
        state = HttpWaitState.model_validate(task.state)
    except ValidationError as exc:
        await _finish(
            db,
            task,
            Status.DISCARDED,
            started_at=now,
            error=f"cannot poll this task: {exc}",
            outcome=Outcome.FAILED,
        )
        return PollResult.DISCARDED
    try:
        signer = signer_for(task.id, await signing_secrets(http, task.client_id))
        response, verdict = await exchange(
            http,
            task_id=task.id,
            client_id=task.client_id,
            method="GET",
            url=state.status_url,
            headers=_poll_headers(payload, state.status_url),
            body=None,
            payload=payload,
            signer=signer,
            judge=lambda r: judge_status(payload, r, now=datetime.now(UTC)),
        )
        if verdict.answer == "see_other":
            result_url = resolve_location(response.url, verdict.location or "")
            response, verdict = await exchange(
                http,
                task_id=task.id,
                client_id=task.client_id,
                method="GET",
                url=result_url,
                headers=_poll_headers(payload, result_url),
                body=None,
                payload=payload,
                signer=signer,
                judge=lambda r: classify(payload, r, now=datetime.now(UTC), accept_async=False),
            )
        elif verdict.answer == "retry":  # the status endpoint itself is failing: poll again
            return await _keep_waiting(
                db, task, state, error=verdict.reason, retry_after_s=verdict.retry_after_s
            )
        # what the answer means is decided inside the try too: a Location that is not a URL ends
        # the wait as it would on the first request, instead of failing every poll for ever
        return await _conclude(db, task, state, response, verdict, queue_settings)
    except Deferred as exc:  # the host is busy or its circuit open: not a poll, try again soon
        return await _keep_waiting(db, task, state, delay_s=exc.after_s, count=False)
    except RetryLater as exc:  # could not reach the status or result URL
        return await _keep_waiting(db, task, state, error=str(exc), retry_after_s=exc.after_s)
    except PermanentError as exc:
        await _finish(
            db, task, Status.DISCARDED, started_at=state.accepted_at, error=str(exc), outcome=Outcome.FAILED
        )
        return PollResult.DISCARDED


async def _conclude(
    db: Database,
    task: WaitingTask,
    state: HttpWaitState,
    response: HttpResponse,
    verdict: Classified,
    queue_settings: QueueCache,
) -> PollResult:
    if verdict.answer == "pending":
        if verdict.location:
            state.status_url = resolve_location(response.url, verdict.location)
        return await _keep_waiting(db, task, state, retry_after_s=verdict.retry_after_s, error=None)
    if verdict.answer == "completed":
        await _finish(
            db,
            task,
            Status.COMPLETED,
            started_at=state.accepted_at,
            result=to_result(response).model_dump(mode="json"),
            http_status=response.status,
            outcome=Outcome.COMPLETED,
        )
        return PollResult.COMPLETED
    if verdict.answer == "retry":
        queue = (await queue_settings.by_ids({task.queue_id}))[task.queue_id]
        decided = after_failure(
            attempt=task.attempts,
            max_attempts=task.max_attempts,
            queue=queue,
            retry_after_s=verdict.retry_after_s,
            retry_base=task.retry_base,
        )
        await _finish(
            db,
            task,
            decided.status,
            started_at=state.accepted_at,
            error=verdict.reason,
            retry_in_s=decided.retry_in_s,
            http_status=response.status,
            outcome=Outcome.FAILED,
        )
        return PollResult(str(decided.status))
    await _finish(
        db,
        task,
        Status.DISCARDED,
        started_at=state.accepted_at,
        error=verdict.reason,
        http_status=response.status,
        outcome=Outcome.FAILED,
    )
    return PollResult.DISCARDED


async def _keep_waiting(
    db: Database,
    task: WaitingTask,
    state: HttpWaitState,
    *,
    error: str | None = None,
    retry_after_s: float | None = None,
    delay_s: float | None = None,
    count: bool = True,
) -> PollResult:
    """Poll again later, or discard when the deadline has passed."""
    now = datetime.now(UTC)
    if count:
        state.polls += 1
        state.last_error = clip_error(error) if error else None  # kept in jsonb: storable, bounded
    left_s = (state.deadline - now).total_seconds()
    if left_s <= 0:
        reason = f"no final answer from {state.status_url} within async_deadline_s"
        await _finish(
            db,
            task,
            Status.DISCARDED,
            started_at=state.accepted_at,
            error=f"{reason} (last error: {error})" if error else reason,
            outcome=Outcome.FAILED,
        )
        return PollResult.DISCARDED
    if delay_s is None:
        delay_s = (
            retry_after_s
            if retry_after_s is not None
            else min(MAX_POLL_INTERVAL_S, FIRST_POLL_S * 2 ** min(state.polls - 1, 16))
        )
    async with db.driver() as conn:
        await store.reschedule_waiting(
            conn,
            task_id=task.id,
            lease=task.lease,
            delay_s=min(delay_s, left_s),  # one last poll at the deadline
            state=state.model_dump(mode="json"),
            error=clip_error(error) if error else None,
        )
    return PollResult.PENDING if error is None else PollResult.POLL_FAILED


async def _give_up_if_late(db: Database, task: WaitingTask, exc: Exception) -> PollResult:
    """A poll that failed unexpectedly is tried again after its claim's lease, but never past the
    task's deadline: the deadline is checked in _keep_waiting, which such a poll never reached, so
    without this an error on every poll kept the task waiting for ever."""
    try:
        state = HttpWaitState.model_validate(task.state)
        if state.deadline > datetime.now(UTC):
            return PollResult.ERROR
        await _finish(
            db,
            task,
            Status.DISCARDED,
            started_at=state.accepted_at,
            error=(
                f"no final answer from {state.status_url} within async_deadline_s "
                f"(polling failed: {type(exc).__name__}: {exc})"
            ),
            outcome=Outcome.FAILED,
        )
    except Exception:
        log.exception("ending a waiting task at its deadline failed", task_id=str(task.id))
        return PollResult.ERROR
    return PollResult.DISCARDED


async def _hand_back(db: Database, task: WaitingTask) -> None:
    try:
        async with db.driver() as conn:
            await store.reschedule_waiting(
                conn, task_id=task.id, lease=task.lease, delay_s=0, state=task.state, error=None
            )
    except Exception as exc:  # the lease still ends: the task is polled again then
        log.warning("handing a poll back failed", task_id=str(task.id), error=str(exc))


async def _finish(
    db: Database,
    task: WaitingTask,
    status: Status,
    *,
    started_at: datetime,
    outcome: Outcome,
    result: Any = None,
    error: str | None = None,
    retry_in_s: float | None = None,
    http_status: int | None = None,
) -> None:
    transition(Status.WAITING, status)  # the state machine has the last word
    guard = [source for source in sources(status) if source == Status.WAITING]
    async with db.driver() as conn:
        finished = await store.finish_waiting(
            conn,
            task_id=task.id,
            lease=task.lease,
            status=str(status),
            guard=guard,
            result=result,
            error=clip_error(error) if error else None,
            retry_in_s=retry_in_s,
            http_status=http_status,
            outcome=outcome,
            started_at=started_at,
        )
    if finished:
        OUTCOMES(task.queue, task.kind, str(status)).inc()
    else:
        log.info("waiting task changed meanwhile (cancelled?); poll result dropped", task_id=str(task.id))


def _poll_headers(payload: HttpPayload, url: str) -> Mapping[str, str]:
    """The task's headers for a GET: no body headers, and no credentials to another origin."""
    same_origin = URL(url, encoded=True).origin() == URL(str(payload.url), encoded=True).origin()
    return {
        name: value
        for name, value in payload.headers.items()
        if name.lower() != "content-type" and (same_origin or name.lower() not in CREDENTIAL_HEADERS)
    }
