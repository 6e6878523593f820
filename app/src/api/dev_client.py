"""DEVELOPMENT ONLY: a single built-in API client, used until real authentication is wired.

It accepts one fixed bearer token and grants every scope to one fixed tenant. It never exists in
the prod profile (Runtime refuses it there).
"""

from __future__ import annotations

import hmac
from uuid import UUID

from app.src.api.models.auth import SCOPES, Principal

DEV_CLIENT_ID = UUID("00000000-0000-4000-8000-000000000de7")
DEV_CLIENT_TOKEN = "tg_dev_only_insecure_token"  # noqa: S105  # nosec B105 - development only


class DevelopmentOnlyAuthenticator:
    async def authenticate(self, token: str) -> Principal | None:
        if hmac.compare_digest(token.encode(), DEV_CLIENT_TOKEN.encode()):
            return Principal(kind="client", client_id=DEV_CLIENT_ID, scopes=frozenset(SCOPES))
        return None


class RejectAllAuthenticator:
    async def authenticate(self, token: str) -> Principal | None:
        return None
