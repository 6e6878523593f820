"""Running one claimed task: its handler, within its timeout, turned into a typed completion.

Every way a handler can end maps to exactly one status and outcome here; the state machine has
the last word on the status, and the engine's failure policy decides retries and dead letters.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from pydantic import BaseModel, ValidationError

from app.src.api.engine import durable
from app.src.api.engine.durable import CompositionError, SpawnRefused, Suspended, Suspension
from app.src.api.engine.outcomes import Backoff, Outcome, after_failure, clip_error, clip_traceback
from app.src.api.kinds import (
    Deferred,
    KindRegistry,
    LeaseLost,
    PermanentError,
    RetryLater,
    TaskCancelled,
    WaitExternal,
)
from app.src.api.models.tasks import MAX_RESULT_BYTES
from app.src.api.state_machine import Status, transition
from app.src.database.tasks import Completion
from app.src.utils import json_text
from app.worker.leases import Running

if TYPE_CHECKING:
    from app.src.api.engine.task_engine import TaskEngine

log = structlog.get_logger("taskgate.worker")

QueueBackoff = Callable[[int], Awaitable[Backoff]]  # queue id -> its backoff settings
SUSPEND_TIMEOUT_S = 10.0


class Executor:
    def __init__(
        self,
        registry: KindRegistry,
        *,
        queue_backoff: QueueBackoff,
        payload_context: Mapping[str, Any] | None,
        engine: TaskEngine | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        self.engine = engine  # suspensions create children through its submit rules
        self.worker_id = worker_id
        self.registry = registry
        self.queue_backoff = queue_backoff
        # the same validation context as at enqueue, so a payload valid then is valid now
        self.payload_context = payload_context

    async def run(self, running: Running) -> Completion | None:
        """The attempt's completion; None when there is nothing (more) to write: it suspended
        (written already, in its own transaction) or its lease was lost."""
        try:
            completion = await self._run(running)
        except Suspended as suspended:
            return await self.suspend(running, suspended.suspension)
        except LeaseLost:
            running.abandoned = "lease lost"
            return None
        if completion.status is Status.COMPLETED:
            spawns = running.ctx.take_spawns()
            if spawns:  # children spawned but never gathered: record them, then finish on a re-run
                return await self.suspend(running, Suspension(spawn=spawns))
        return completion

    async def suspend(self, running: Running, suspension: Suspension) -> Completion | None:
        claimed = running.claimed
        if self.engine is None or self.worker_id is None:
            return finished(
                running, Status.DISCARDED, Outcome.FAILED, error="this worker cannot suspend tasks"
            )
        try:
            async with asyncio.timeout(SUSPEND_TIMEOUT_S):
                status = await durable.suspend(
                    self.engine,
                    task_id=claimed.id,
                    client_id=claimed.client_id,
                    attempt=claimed.attempt,
                    worker_id=self.worker_id,
                    suspension=suspension,
                )
        except CompositionError as exc:
            return finished(running, Status.DISCARDED, Outcome.FAILED, error=str(exc))
        except SpawnRefused as exc:
            return await self.failed(running, str(exc), retry_after_s=exc.retry_after_s)
        if status is None:
            running.abandoned = "lease lost"
        return None

    async def _run(self, running: Running) -> Completion:
        claimed, ctx = running.claimed, running.ctx
        if running.unloadable is not None:  # it cannot replay what it stored: it must not run
            error = f"its stored state could not be loaded: {running.unloadable.error}"
            if running.unloadable.permanent:
                return finished(running, Status.DISCARDED, Outcome.FAILED, error=error)
            return await self.failed(running, error)
        kind = self.registry.get(claimed.kind)
        if kind is None:
            return await self.failed(running, f"no task kind {claimed.kind!r} is declared in this worker")
        try:
            payload = kind.validate_payload(claimed.payload, context=self.payload_context)
        except ValidationError as exc:
            error = f"payload no longer matches the contract of kind {kind.name!r}: {exc}"
            return finished(running, Status.DISCARDED, Outcome.INVALID_PAYLOAD, error=error)
        deadline: asyncio.Timeout | None = None
        try:
            if kind.timeout_s is not None:
                async with asyncio.timeout(kind.timeout_s) as deadline:
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
            return finished(running, Status.COMPLETED, Outcome.COMPLETED, result=result)
        except RetryLater as exc:
            log.info("task will be retried", task_id=str(claimed.id), kind=claimed.kind, reason=str(exc))
            return await self.failed(
                running, str(exc), retry_after_s=exc.after_s, http_status=exc.http_status
            )
        except PermanentError as exc:
            log.info("task failed permanently", task_id=str(claimed.id), kind=claimed.kind, reason=str(exc))
            return finished(
                running, Status.DISCARDED, Outcome.FAILED, error=str(exc), http_status=exc.http_status
            )
        except Deferred as exc:
            # not an attempt: the attempt count goes back and no attempt record is written
            return finished(running, Status.RETRYABLE, Outcome.DEFERRED, retry_in_s=exc.after_s, refund=True)
        except TaskCancelled as exc:
            return finished(running, Status.CANCELLED, Outcome.CANCELLED, error=str(exc) or "cancelled")
        except WaitExternal as exc:
            return finished(
                running,
                Status.WAITING,
                Outcome.WAITING,
                state=exc.state,
                retry_in_s=exc.poll_after_s,
                http_status=exc.http_status,
            )
        except TimeoutError as exc:
            if deadline is not None and deadline.expired():
                return await self.failed(running, f"timed out after {kind.timeout_s} s")
            return await self._raised(running, exc)  # the handler's own
        except ValidationError as exc:
            return await self.failed(running, f"result does not match the contract of {kind.name!r}: {exc}")
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this attempt is being stopped: shutdown, or its lease was lost
            # raised inside the handler (it awaited something cancelled): a failure like any
            # other; let through, it would end the attempt with nothing written and its slot held
            return await self._raised(running, exc)
        except Exception as exc:
            return await self._raised(running, exc)

    async def _raised(self, running: Running, exc: BaseException) -> Completion:
        """A handler's exception: a failed attempt, with its traceback (formatted here, on the
        failure path only: a success never pays for it)."""
        claimed = running.claimed
        trace = clip_traceback(traceback.format_exc())
        log.warning(
            "task failed", task_id=str(claimed.id), kind=claimed.kind, error=repr(exc), traceback=trace
        )
        return await self.failed(running, f"{type(exc).__name__}: {exc}", traceback=trace)

    async def failed(
        self,
        running: Running,
        error: str,
        *,
        retry_after_s: float | None = None,
        http_status: int | None = None,
        traceback: str | None = None,
    ) -> Completion:
        claimed = running.claimed
        decided = after_failure(
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            queue=await self.queue_backoff(claimed.queue_id),
            retry_after_s=retry_after_s,
            retry_base=claimed.retry_base,
        )
        return finished(
            running,
            decided.status,
            Outcome.FAILED,
            error=error,
            retry_in_s=decided.retry_in_s,
            http_status=http_status,
            traceback=traceback,
        )


def finished(
    running: Running,
    status: Status,
    outcome: Outcome,
    *,
    result: Any = None,
    error: str | None = None,
    retry_in_s: float | None = None,
    http_status: int | None = None,
    state: dict[str, Any] | None = None,
    refund: bool = False,
    traceback: str | None = None,
) -> Completion:
    """The completion of a running attempt, checked against the state machine."""
    claimed = running.claimed
    transition(Status.RUNNING, status)
    elapsed = timedelta(seconds=time.perf_counter() - running.started)
    return Completion(
        id=claimed.id,
        attempt=claimed.attempt,
        status=status,
        outcome=outcome,
        started_at=claimed.started_at,
        finished_at=claimed.started_at + elapsed,
        result=result,
        error=None if error is None else clip_error(error),
        retry_in_s=retry_in_s,
        http_status=running.ctx.http_status if http_status is None else http_status,
        state=state,
        refund=refund,
        traceback=traceback,
    )


def _storable(result: Any) -> None:
    """A result PostgreSQL cannot store would fail the completion batch of every task with it; the
    task fails permanently instead (a handler that returns it will return it again). So does one
    past MAX_RESULT_BYTES, what a remote worker's completion can carry: a result is loaded whole by
    every read of its task and by its parent's gather."""
    if result is None:
        return
    try:
        text = json_text.storable(result)
    except ValueError as exc:
        raise PermanentError(f"the handler's result cannot be stored: {exc}") from None
    # a character is at most 4 bytes of UTF-8: a short text is not encoded to be measured
    if len(text) > MAX_RESULT_BYTES // 4 and (size := len(text.encode())) > MAX_RESULT_BYTES:
        raise PermanentError(
            f"the handler's result is {size} bytes of JSON, past the {MAX_RESULT_BYTES} a result may"
            " hold: store large data elsewhere and return a reference to it"
        )
