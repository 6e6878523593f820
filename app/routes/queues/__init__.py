"/api/queues: per-client queue settings, counts, pause, resume and purge."

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_querystring, validate_request, validate_response

from app.middlewares import requires_scopes
from app.routes.context import client_id, db, engine, tenant
from app.src.api import queues
from app.src.api.models.tasks import ClientFilterQuery, PurgeOut, QueueIn, QueueList, QueueName, QueueOut

blueprint = Blueprint("queues", __name__)
NAME = "/<string(maxlength=64):name>"


@blueprint.get("")
@requires_scopes("tasks:read")
@validate_querystring(ClientFilterQuery)
@validate_response(QueueList)
async def list_queues(query_args: ClientFilterQuery) -> QueueList:
    """List this client's queues (`default` always exists) in name order, in pages of `limit`
    (`next_cursor`); an operator may name a `client_id`."""
    items, next_cursor = await queues.list_queues(
        db(), client_id=tenant(query_args.client_id), limit=query_args.limit, cursor=query_args.cursor
    )
    return QueueList(items=[QueueOut.from_domain(q) for q in items], next_cursor=next_cursor)


@blueprint.put(NAME)
@requires_scopes("queues:admin")
@validate_request(QueueIn)
@validate_response(QueueOut)
async def put_queue(name: str, data: QueueIn) -> QueueOut:
    """Create a queue or change its settings (omitted fields keep their values; null lifts a limit).

    A client has at most CLIENT_MAX_QUEUES queues (10,000 by default): past it, naming a new queue
    is a 409 `urn:taskgate:problem:too-many-queues` and creates nothing."""
    _check_name(name)
    return QueueOut.from_domain(await queues.put(engine(), client_id=client_id(), name=name, data=data))


@blueprint.get(NAME)
@requires_scopes("tasks:read")
@validate_response(QueueOut)
async def get_queue(name: str) -> QueueOut:
    """A queue with its task counts by status and the age of its oldest available task."""
    queue, counts, oldest = await queues.get_with_counts(db(), client_id=client_id(), name=name)
    return QueueOut.from_domain(queue, counts=counts, oldest_age_s=oldest)


@blueprint.post(NAME + "/pause")
@requires_scopes("queues:admin")
@validate_response(QueueOut)
async def pause_queue(name: str) -> QueueOut:
    """Stop claiming from this queue; running tasks finish."""
    return QueueOut.from_domain(
        await queues.set_paused(engine(), client_id=client_id(), name=name, paused=True)
    )


@blueprint.post(NAME + "/resume")
@requires_scopes("queues:admin")
@validate_response(QueueOut)
async def resume_queue(name: str) -> QueueOut:
    """Claim from this queue again."""
    return QueueOut.from_domain(
        await queues.set_paused(engine(), client_id=client_id(), name=name, paused=False)
    )


@blueprint.post(NAME + "/purge")
@requires_scopes("queues:admin")
@validate_response(PurgeOut)
async def purge_queue(name: str) -> PurgeOut:
    """Delete the queue's tasks that have not started (scheduled, available, retryable).

    In short statements of 1,000, at most 100,000 a call (`purged` says how many; call again for
    the rest). A task in a composition is cancelled instead, so what waits for it learns of it."""
    return PurgeOut(purged=await queues.purge(db(), client_id=client_id(), name=name))


def _check_name(name: str) -> None:
    from pydantic import TypeAdapter, ValidationError

    from app.src.api.errors import Unprocessable, field_errors

    try:
        TypeAdapter(QueueName).validate_python(name)
    except ValidationError as exc:
        raise Unprocessable(
            "Queue names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            errors=field_errors(exc.errors(include_url=False, include_input=False), prefix=("path", "name")),
        ) from None
