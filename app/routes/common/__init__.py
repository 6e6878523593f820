"""Liveness, readiness, version, and the Prometheus scrape endpoint."""

from __future__ import annotations

import hmac
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response, current_app, request
from quart_schema import hide, validate_response

from app.middlewares import public
from app.src.api.errors import Unauthorized
from app.src.api.models.common import Health, Readiness, Version
from app.src.database.migrations import head_revisions
from app.version import __version__

blueprint = Blueprint("common", __name__)
metrics = Blueprint("metrics", __name__)


@blueprint.get("/health")
@public
@validate_response(Health)
async def health() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@blueprint.get("/ready")
@public
@validate_response(Readiness, 200)
@validate_response(Readiness, 503)
async def ready() -> tuple[Readiness, int]:
    """Readiness: database reachable, schema at head, background roles running."""
    checks = await current_app.extensions["taskgate"].readiness()
    ok = all(checks.values())
    return Readiness(ready=ok, checks=checks), 200 if ok else 503


@blueprint.get("/version")
@public
@validate_response(Version)
async def version() -> Version:
    """The running version and the migration heads it expects."""
    return Version(name="taskgate", version=__version__, schema_heads=sorted(head_revisions()))


@metrics.get("/metrics")
@public
@hide
async def prometheus() -> Any:
    """Prometheus text format; with METRICS_TOKEN set, only for `Authorization: Bearer <token>`."""
    expected = current_app.config["TASKGATE_SETTINGS"].METRICS_TOKEN
    if expected:
        scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), expected.encode()
        ):
            raise Unauthorized(
                "GET /metrics needs 'Authorization: Bearer <METRICS_TOKEN>'.",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)
