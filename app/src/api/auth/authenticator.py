"""Bearer token → Principal: API keys (machines) and operator sessions, plus the per-client rate limit.

No cache on purpose: every request is checked against the database after it arrived, so logout,
key revocation and client disablement take effect on the very next request, in every process.
Concurrent requests share that lookup (one `WHERE prefix = ANY(...)` round trip, see
app/src/utils/coalesce.py); each still reads state committed before it was received.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from app.database import Database, StorageUnavailable
from app.src.api.auth.rate_limit import TokenBuckets, retry_after_seconds
from app.src.api.errors import TooManyRequests
from app.src.api.models.auth import SCOPES, KeyCredential, Principal
from app.src.database import auth as store
from app.src.encryption import tokens
from app.src.utils.coalesce import Coalescer

log = structlog.get_logger("taskgate.auth")
OPERATOR_SCOPES = frozenset(SCOPES)


class Authenticator:
    """What the middleware calls for every authenticated route (Runtime.authenticator)."""

    def __init__(
        self,
        database: Callable[[], Database],
        *,
        buckets: TokenBuckets | None = None,
        lookup_deadline_s: float | None = None,
    ) -> None:
        # a callable, because the Database exists only once the runtime has started
        self._database = database
        self.buckets = buckets or TokenBuckets()
        # every authenticated request waits on this lookup: past its deadline it is a 503, so a
        # stalled database cannot queue requests behind one batch without bound
        self._key_lookups: Coalescer[str, KeyCredential | None] = Coalescer(
            self._find_keys,
            deadline_s=lookup_deadline_s,
            on_deadline=lambda: StorageUnavailable("the database did not answer the key lookup in time"),
        )

    async def authenticate(self, token: str) -> Principal | None:
        """The principal a token stands for, or None (401); raises TooManyRequests over the rate."""
        principal = await self.identify(token)
        if principal is not None and principal.rate_limit_per_s is not None:
            wait = self.buckets.take(principal.client_id, rate=principal.rate_limit_per_s)
            if wait > 0:
                raise TooManyRequests(
                    "This client is over its request rate limit.", retry_after=retry_after_seconds(wait)
                )
        return principal

    async def identify(self, token: str) -> Principal | None:
        """The principal a token stands for now, or None; no rate limit is charged (an open event
        stream asks this again while it runs)."""
        prefix = tokens.parse_api_key(token)
        if prefix is not None:
            return await self._api_key(prefix, token)
        if tokens.opaque_kind(token) == tokens.SESSION_PREFIX:
            return await self._session(token)
        return None

    async def _api_key(self, prefix: str, token: str) -> Principal | None:
        found = await self._key_lookups.submit(prefix)
        if found is None or not tokens.same(found.key_hash, tokens.digest(token)):
            log.info("auth.token.rejected", kind="api_key")
            return None
        if found.client_disabled:
            log.info("auth.token.rejected", kind="api_key", reason="client disabled")
            return None
        return Principal(
            kind="client",
            client_id=found.client_id,
            scopes=frozenset(found.scopes),
            key_id=found.key_id,
            max_queued_tasks=found.max_queued_tasks,
            rate_limit_per_s=found.rate_limit_per_s,
        )

    async def _find_keys(self, prefixes: list[str]) -> list[KeyCredential | None]:
        async with self._database().driver() as conn:
            return await store.find_keys(conn, prefixes)

    async def _session(self, token: str) -> Principal | None:
        token_hash = tokens.digest(token)
        async with self._database().driver() as conn:
            found = await store.find_session(conn, token_hash)
        # found by its digest through the unique index; compared again in constant time so every
        # secret check reads the same way
        if found is None or not tokens.same(found.token_hash, token_hash):
            log.info("auth.token.rejected", kind="session")
            return None
        return Principal(
            kind="operator",
            client_id=found.user_id,
            scopes=OPERATOR_SCOPES,
            operator_id=found.user_id,
            session_id=found.session_id,
        )
