"""/api/catalog: the task kinds this deployment runs and this client's remote kinds, with their contracts."""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request, validate_response

from app.middlewares import requires_scopes
from app.routes.context import client_id, db, engine
from app.src.api.engine import remote_kinds
from app.src.api.kinds import REGISTRY
from app.src.api.models.common import ListQuery
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
@validate_querystring(ListQuery)
@validate_response(KindList)
async def list_kinds(query_args: ListQuery) -> KindList:
    """Every task kind with its payload and result JSON Schema; `remote` marks this client's own."""
    local = [
        KindOut(
            name=kind.name,
            aliases=list(kind.aliases),
            payload_schema=kind.payload.model_json_schema(),
            result_schema=kind.result.model_json_schema() if kind.result else None,
            max_attempts=kind.max_attempts,
            description=kind.description,
        )
        for kind in REGISTRY.all()
    ]
    remote = await remote_kinds.kinds_of(db(), client_id=client_id(), fresh=True)
    return KindList(items=local + [_remote_out(kind) for kind in remote.values()])


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
