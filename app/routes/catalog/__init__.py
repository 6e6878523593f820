"""/api/catalog: the task kinds this deployment runs and this client's remote kinds, with their contracts."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request, validate_response

from app.middlewares import requires_scopes
from app.routes.context import client_id, db, engine
from app.src.api import pages
from app.src.api.engine import remote_kinds
from app.src.api.kinds import REGISTRY, TaskKind
from app.src.api.models.common import PageQuery
from app.src.api.models.tasks import KindList, KindOut
from app.src.api.models.workers import RemoteKindIn
from app.src.database.workers import RemoteKindRow

blueprint = Blueprint("catalog", __name__)


def _remote_out(kind: RemoteKindRow) -> KindOut:
    return KindOut(
        name=kind.name,
        aliases=[],
        payload_schema=kind.payload_schema,
        result_schema=kind.result_schema,
        max_attempts=kind.max_attempts,
        description=kind.description,
        remote=True,
    )


@blueprint.get("/kinds")
@requires_scopes("tasks:read")
@validate_querystring(PageQuery)
@validate_response(KindList)
async def list_kinds(query_args: PageQuery) -> KindList:
    """Every task kind with its payload and result JSON Schema; `remote` marks this client's own.

    The kinds this deployment runs come first, then the client's remote kinds (any number), each
    in name order; in pages of `limit` (`next_cursor`)."""
    phase, after = _kinds_cursor(query_args.cursor)
    wanted = query_args.limit + 1  # one more than the page: is there a next one?
    found: list[KindOut] = []
    if phase == LOCAL:
        mine = sorted(REGISTRY.all(), key=lambda k: k.name)
        # cut the page before building each kind's schemas, not after
        found = [_local_out(kind) for kind in [k for k in mine if after is None or k.name > after][:wanted]]
        after = None
    if len(found) < wanted:
        remote = await remote_kinds.page_of_kinds(
            db(), client_id=client_id(), after=after, limit=wanted - len(found)
        )
        found += [_remote_out(kind) for kind in remote]
    items, next_cursor = pages.page(found, query_args.limit, lambda k: (int(k.remote), k.name))
    return KindList(items=items, next_cursor=next_cursor)


LOCAL, REMOTE = 0, 1  # the two parts of the catalog, in the order it lists them


def _kinds_cursor(cursor: str | None) -> tuple[int, str | None]:
    if cursor is None:
        return LOCAL, None
    phase, name = pages.decode(cursor, int, str)
    if phase not in (LOCAL, REMOTE):
        raise pages.invalid_cursor()
    return int(phase), str(name)


def _local_out(kind: TaskKind[Any, Any]) -> KindOut:
    return KindOut(
        name=kind.name,
        aliases=list(kind.aliases),
        payload_schema=kind.payload.model_json_schema(),
        result_schema=kind.result.model_json_schema() if kind.result else None,
        max_attempts=kind.max_attempts,
        description=kind.description,
    )


@blueprint.put("/kinds/<name>")
@requires_scopes("kinds:admin")
@validate_request(RemoteKindIn)
@validate_response(KindOut, 200)
@validate_response(KindOut, 201)
async def put_kind(name: str, data: RemoteKindIn) -> tuple[KindOut, int]:
    """Register or update a remote kind of this client (JSON Schema 2020-12 contracts).

    Its tasks are claimed only by this client's remote workers (POST /api/workers/claim).
    """
    kind, created = await remote_kinds.register(
        db(),
        engine().rules.kinds,
        client_id=client_id(),
        name=name,
        payload_schema=data.payload_schema,
        result_schema=data.result_schema,
        description=data.description,
        max_attempts=data.max_attempts,
    )
    return _remote_out(kind), 201 if created else 200


@blueprint.delete("/kinds/<name>")
@requires_scopes("kinds:admin")
async def delete_kind(name: str) -> Response:
    """Remove a remote kind; its tasks that have not started are discarded with a clear error."""
    await remote_kinds.delete(db(), client_id=client_id(), name=name)
    return Response(status=204)
