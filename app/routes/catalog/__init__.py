"""/api/catalog: the task kinds this deployment runs, with their contracts."""

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_response

from app.middlewares import requires_scopes
from app.src.api.kinds import REGISTRY
from app.src.api.models.tasks import KindList, KindOut

blueprint = Blueprint("catalog", __name__)


@blueprint.get("/kinds")
@requires_scopes("tasks:read")
@validate_response(KindList)
async def list_kinds() -> KindList:
    """Every task kind with its payload and result JSON Schema."""
    return KindList(
        items=[
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
    )
