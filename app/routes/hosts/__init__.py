"""/api/hosts: the destinations of `http` tasks, their adaptive limits, load and health."""

from __future__ import annotations

from dataclasses import asdict

from quart import Blueprint
from quart_schema import validate_querystring, validate_response

from app.middlewares import requires_scopes
from app.routes.context import db, principal, tenant
from app.src.api import pages
from app.src.api.engine import flow
from app.src.api.models.hosts import HostList, HostOut
from app.src.api.models.tasks import ClientFilterQuery

blueprint = Blueprint("hosts", __name__)


@blueprint.get("")
@requires_scopes("queues:admin")
@validate_querystring(ClientFilterQuery)
@validate_response(HostList)
async def list_hosts(query_args: ClientFilterQuery) -> HostList:
    """Each destination host of this client's `http` tasks: its adaptive concurrency limit,
    requests in flight (cluster-wide), circuit state and recent error rate; in name order, in
    pages of `limit` (`next_cursor`).

    An operator session sees every host, or those of the client it names with `client_id`.
    """
    every = principal().kind == "operator" and query_args.client_id is None
    rows, last = await flow.task_hosts(
        db(),
        client_id=None if every else tenant(query_args.client_id),
        limit=query_args.limit,
        after=None if query_args.cursor is None else str(pages.decode(query_args.cursor, str)[0]),
    )
    limit = db().settings.HTTP_HOST_MAX_CONCURRENCY
    return HostList(
        items=[HostOut.model_validate({**asdict(row), "max_concurrency": limit}) for row in rows],
        next_cursor=None if last is None else pages.encode((last,)),
    )
