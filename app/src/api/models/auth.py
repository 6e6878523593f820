"""Who is calling: the principal the middleware binds to every authenticated request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

SCOPES = ("tasks:read", "tasks:write", "queues:admin", "schedules:admin", "clients:admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """An API client (machine) or an operator session; `client_id` is the tenant."""

    kind: Literal["client", "operator"]
    client_id: UUID
    scopes: frozenset[str]
    operator_id: UUID | None = None
    key_id: UUID | None = None
    max_queued_tasks: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def allows(self, *scopes: str) -> bool:
        return all(scope in self.scopes for scope in scopes)
