"""Throttling of failed logins and TOTP attempts, per account and per address, in PostgreSQL.

Counting in PostgreSQL (not in process memory) makes the limit hold across every API replica
and restart. A key may fail `free_failures - 1` times freely; from then on each failure blocks it
for an exponentially growing delay (1 s, 2 s, 4 s, ... up to 15 min), and a key quiet for
`forget_after_s` starts over. Blocked attempts are refused before any password or code is
checked, so they reveal nothing. Per-account keys are the email as typed (lowercased), whether or
not the account exists, so a 429 says nothing about which accounts exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from app.database import Database
from app.src.api.auth.access import transaction
from app.src.api.errors import TooManyRequests
from app.src.database import auth as store

log = structlog.get_logger("taskgate.auth")


@dataclass(frozen=True, slots=True)
class Policy:
    scope: str
    free_failures: int
    base_delay_s: float = 1.0
    max_delay_s: float = 900.0
    forget_after_s: float = 900.0


LOGIN_ACCOUNT = Policy("login:account", free_failures=5)
LOGIN_ADDRESS = Policy("login:address", free_failures=10)
TOTP_ACCOUNT = Policy("totp:account", free_failures=5)
TOTP_ADDRESS = Policy("totp:address", free_failures=10)


def lockout_seconds(policy: Policy, failures: int) -> float:
    """How long a key is blocked after its `failures`-th consecutive failure."""
    if failures < policy.free_failures:
        return 0.0
    exponent = min(failures - policy.free_failures, 32)  # 2**32 s is past any cap
    return float(min(policy.max_delay_s, policy.base_delay_s * 2**exponent))


Subject = tuple[Policy, str]


async def refuse_if_blocked(db: Database, subjects: Sequence[Subject], *, event: str) -> None:
    async with db.driver() as conn:
        retry_after = await store.blocked_for(conn, [(policy.scope, key) for policy, key in subjects])
    if retry_after > 0:
        log.warning(event, outcome="throttled", retry_after=retry_after)
        raise TooManyRequests("Too many failed attempts; wait before trying again.", retry_after=retry_after)


async def record_failures(db: Database, subjects: Sequence[Subject]) -> None:
    async with transaction(db) as conn:
        for policy, key in subjects:
            failures = await store.record_failure(
                conn, scope=policy.scope, key=key, forget_after_s=policy.forget_after_s
            )
            delay = lockout_seconds(policy, failures)
            if delay > 0:
                await store.block(conn, scope=policy.scope, key=key, seconds=delay)


async def forget(db: Database, subjects: Sequence[Subject]) -> None:
    async with db.driver() as conn:
        await store.clear_failures(conn, [(policy.scope, key) for policy, key in subjects])
