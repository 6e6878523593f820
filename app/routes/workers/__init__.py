"""/api/workers: remote workers claim, renew and complete their client's tasks over HTTPS."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from quart import Blueprint, Response, current_app
from quart_schema import document_response, validate_querystring, validate_request, validate_response

from app.middlewares import requires_scopes, still_allowed
from app.routes.context import client_id, db, engine, notifier, runtime
from app.runtime import SHUTDOWN_RETRY_AFTER_S
from app.src.api import workers
from app.src.api.models.workers import (
    ClaimedOut,
    ClaimIn,
    ClaimOut,
    CompleteIn,
    CompleteOut,
    CompletionOut,
    HeartbeatIn,
    HeartbeatOut,
    LeaseOut,
    WorkerList,
    WorkerListQuery,
    WorkerOut,
)

blueprint = Blueprint("workers", __name__)


def _lease_s() -> float:
    return float(runtime().settings.LEASE_SECONDS)


@blueprint.post("/claim")
@requires_scopes("tasks:work")
@validate_request(ClaimIn)
@document_response(ClaimOut)
async def claim(data: ClaimIn) -> Response:
    """Claim tasks of this client's remote kinds; long-polls up to `wait_s` when there are none.

    A server that is shutting down ends the long-poll at once (with whatever it claimed, often
    nothing) and a `Retry-After` header: claim again (another replica answers)."""
    lease_s = _lease_s()
    stopping = runtime().shutting_down
    answer = await workers.claim(
        db(),
        notifier(),
        client_id=client_id(),
        data=data,
        lease_s=lease_s,
        stopping=stopping,
        allowed=still_allowed("tasks:work"),
    )
    response: Response
    if answer.held:  # loaded durable state: sent in pieces, its share of the budget held till sent
        try:
            response = _streamed(answer, lease_s)
        except BaseException:
            answer.release(delivered=False)
            raise
    else:
        async with answer as claimed:
            response = current_app.json.response(_answer(claimed, lease_s))  # type: ignore[assignment]
    if stopping.is_set():
        response.headers["Retry-After"] = str(SHUTDOWN_RETRY_AFTER_S)
    return response


# An answer that carries loaded durable state (up to MAX_CLAIM_STATE_BYTES) is sent in pieces of
# this size, each once the connection has taken the last: a worker that stops reading holds one
# piece in the server's buffers, not its whole answer, and the answer's share of the process's
# budget (workers.LOADED_STATE) is held until the last piece is sent.
ANSWER_CHUNK_BYTES = 64 * 1024


def _streamed(answer: workers.ClaimAnswer, lease_s: float) -> Response:
    """The answer as `json.response` writes it (keys sorted: items, then lease_s), sent piece by
    piece within the lease (past it the tasks are the rescuer's anyway). An answer cut short (its
    worker gone or too slow) reached no worker whole: it is released undelivered, its tasks handed
    back unspent. One never sent at all (the request ended before its body began) gives back what
    it held when it is collected."""
    encode = current_app.json.dumps

    async def body() -> AsyncIterator[bytes]:
        delivered = False
        try:
            yield b'{"items":['
            for index, claimed in enumerate(answer.claimed):
                text = (b"," if index else b"") + encode(_item(claimed)).encode()
                for start in range(0, len(text), ANSWER_CHUNK_BYTES):
                    yield text[start : start + ANSWER_CHUNK_BYTES]
            yield f'],"lease_s":{encode(lease_s)}}}'.encode()
            delivered = True
        finally:
            answer.release(delivered=delivered)

    chunks = body()
    weakref.finalize(chunks, answer.release)
    response = Response(chunks, content_type="application/json")
    response.timeout = lease_s
    return response


def _answer(claimed: list[workers.Claimed], lease_s: float) -> ClaimOut:
    return ClaimOut(lease_s=lease_s, items=[_item(c) for c in claimed])


def _item(c: workers.Claimed) -> ClaimedOut:
    return ClaimedOut(
        id=c.task.id,
        kind=c.task.kind,
        queue=c.task.queue,
        payload=c.task.payload,
        attempt=c.task.attempt,
        max_attempts=c.task.max_attempts,
        lease_expires_at=c.lease_expires_at,
        traceparent=c.traceparent,
        **(
            {}
            if c.state is None
            else {
                "steps": c.state.steps,
                "signals": c.state.signals,
                "children": c.state.children,
                "waits": sorted(c.state.waits),
            }
        ),
    )


@blueprint.post("/heartbeat")
@requires_scopes("tasks:work")
@validate_request(HeartbeatIn)
@validate_response(HeartbeatOut)
async def heartbeat(data: HeartbeatIn) -> HeartbeatOut:
    """Renew the leases of running tasks; `lost` lists those this worker no longer holds."""
    leases, lost = await workers.heartbeat(db(), client_id=client_id(), data=data, lease_s=_lease_s())
    return HeartbeatOut(
        items=[LeaseOut(id=x.id, lease_expires_at=x.lease_expires_at, cancel_requested=x.cancel_requested)
               for x in leases],
        lost=lost,
    )  # fmt: skip


@blueprint.post("/complete")
@requires_scopes("tasks:work")
@validate_request(CompleteIn)
@validate_response(CompleteOut)
async def complete(data: CompleteIn) -> CompleteOut:
    """Finish attempts in a batch; a stale or duplicate completion is `accepted: false`."""
    answers = await workers.complete(engine(), client_id=client_id(), data=data)
    return CompleteOut(items=[CompletionOut(id=a.id, accepted=a.accepted, status=a.status) for a in answers])


@blueprint.get("")
@requires_scopes("tasks:read")
@validate_querystring(WorkerListQuery)
@validate_response(WorkerList)
async def list_workers(query_args: WorkerListQuery) -> WorkerList:
    """Workers seen in the last 10 minutes: this client's remote ones and the in-process ones, in
    id order, in keyset pages (`limit`, `cursor`; `next_cursor` absent on the last page)."""
    rows, next_cursor = await workers.list_workers(
        db(), client_id=client_id(), limit=query_args.limit, cursor=query_args.cursor
    )
    return WorkerList(
        items=[WorkerOut.model_validate(row, from_attributes=True) for row in rows], next_cursor=next_cursor
    )
