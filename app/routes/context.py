"""Accessors for what the middleware and the serving lifecycle put in place for a request."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from quart import current_app, g

from app.src.api.engine.submit import Submitter

if TYPE_CHECKING:
    from app.database import Database
    from app.runtime import Runtime
    from app.src.api.engine.task_engine import TaskEngine
    from app.src.api.models.auth import Principal
    from app.src.database.notifications import Notifier


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["taskgate"]
    return rt


def db() -> Database:
    return runtime().db


def notifier() -> Notifier:
    n = runtime().notifier
    if n is None:
        raise RuntimeError("the runtime has not started")
    return n


def client_id() -> UUID:
    cid: UUID = g.client_id
    return cid


def tenant(requested: UUID | None) -> UUID:
    """The tenant a read is for: the caller's own, or for an operator session any client it names.

    An API client naming another client is refused (403), naming itself is the same as not naming.
    """
    if requested is None or requested == client_id():
        return client_id()
    if principal().kind != "operator":
        from app.src.api.errors import Forbidden

        raise Forbidden("Only an operator session may read another client's data (client_id).")
    return requested


def principal() -> Principal:
    p: Principal = g.principal
    return p


def engine() -> TaskEngine:
    return runtime().engine


def submitter() -> Submitter:
    """The calling tenant as the engine's submit path knows it (its id and its own quota)."""
    p = principal()
    return Submitter(p.client_id, p.max_queued_tasks)
