"""Throttling of failed logins and TOTP attempts, per account and per address, in PostgreSQL.

Counting in PostgreSQL (not in process memory) makes the limit hold across every API replica
and restart. A key may fail `free_failures - 1` times freely; from then on each failure blocks it
for an exponentially growing delay (1 s, 2 s, 4 s, ... up to 15 min), and a key quiet for
`forget_after_s` starts over. Blocked attempts are refused before any password or code is
checked, so they reveal nothing. Per-account keys are the email as typed (lowercased), whether or
not the account exists, so a 429 says nothing about which accounts exist. Per-address keys are an
IPv4 address or an IPv6 /64 (`address_key`).

An attempt holds its account's key while it checks (`attempt`): a second attempt on the same
account meanwhile is refused at once (429), so parallel guesses cannot all pass the check before
the first failure is counted. The hold is the key's `blocked_until`, set for IN_FLIGHT_S at most:
an attempt that never ends (a killed process) frees the account when it runs out. Its address is
charged a failure before the check (taken back if the attempt succeeds), so parallel guesses from
one address at many accounts cannot all pass it either: attempts in flight count against its free
failures, and past them the address too is tried one attempt at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Sequence
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


def address_key(address: str) -> str:
    """The unit an address is throttled by: an IPv4 address, or the /64 of an IPv6 one (a host is
    routinely given a whole /64, and could otherwise take a fresh address for every guess)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an address ("unknown"): a key of its own
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


Subject = tuple[Policy, str]
IN_FLIGHT_S = 30.0  # longer than any password check waits for the hasher


@dataclass(slots=True)
class Attempt:
    failed: bool = False  # set by the caller before it raises its refusal


class _InFlight(Exception):
    pass


class _Blocked(Exception):
    pass


@contextlib.asynccontextmanager
async def attempt(db: Database, subjects: Sequence[Subject], *, event: str) -> AsyncIterator[Attempt]:
    """One login or code attempt, the only one in flight for its account (`subjects[0]`).

    Refused (429) while any subject is blocked or another attempt holds the account. The other
    subjects (the address) are charged a failure before the caller checks anything: refunded if
    the attempt succeeds, its lockout applied if the caller marks it failed (`failed = True`);
    the account's failure is counted when the block exits, and its hold becomes its lockout (or
    ends).
    """
    await refuse_if_blocked(db, subjects, event=event)
    (account, account_key), others = subjects[0], subjects[1:]
    charged: list[int] = []
    try:
        async with transaction(db) as conn:  # all of it or nothing: a refusal holds and charges none
            if not await store.hold(conn, scope=account.scope, key=account_key, seconds=IN_FLIGHT_S):
                raise _InFlight
            for policy, key in others:
                count = await store.charge(
                    conn,
                    scope=policy.scope,
                    key=key,
                    forget_after_s=policy.forget_after_s,
                    hold_from=policy.free_failures,
                    hold_s=IN_FLIGHT_S,
                )
                if count is None:
                    raise _Blocked
                charged.append(count)
    except _InFlight:
        log.warning(event, outcome="throttled", reason="attempt in flight")
        raise TooManyRequests(
            "Another attempt for this account is in progress; retry shortly.", retry_after=1
        ) from None
    except _Blocked:
        await refuse_if_blocked(db, others, event=event)  # with the time it is blocked for
        log.warning(event, outcome="throttled", reason="address attempt in flight")
        raise TooManyRequests("Too many failed attempts; wait before trying again.", retry_after=1) from None
    outcome = Attempt()
    try:
        yield outcome
    except asyncio.CancelledError:
        # the client went away before its answer: counted as a failure, or hanging up once the
        # password reached the hasher would buy argon2 runs that no throttle ever sees
        outcome.failed = True
        raise
    finally:
        # shielded: a client that goes away mid-attempt must not leave a failure uncounted
        await asyncio.shield(_end(db, subjects, charged, failed=outcome.failed))


async def _end(db: Database, subjects: Sequence[Subject], charged: Sequence[int], *, failed: bool) -> None:
    (policy, key), others = subjects[0], subjects[1:]
    async with transaction(db) as conn:
        seconds = 0.0
        if failed:
            failures = await store.record_failure(
                conn, scope=policy.scope, key=key, forget_after_s=policy.forget_after_s
            )
            seconds = lockout_seconds(policy, failures)
        await store.release(conn, scope=policy.scope, key=key, blocked_for_s=seconds)
        for (other, other_key), count in zip(others, charged, strict=True):
            held = count >= other.free_failures  # its charge holds the key until now
            if not failed:
                await store.refund(conn, scope=other.scope, key=other_key, held=held)
            elif held:  # the failure is counted already: its hold becomes its lockout
                await store.release(
                    conn, scope=other.scope, key=other_key, blocked_for_s=lockout_seconds(other, count)
                )


async def refuse_if_blocked(db: Database, subjects: Sequence[Subject], *, event: str) -> None:
    async with db.driver() as conn:
        retry_after = await store.blocked_for(conn, [(policy.scope, key) for policy, key in subjects])
    if retry_after > 0:
        log.warning(event, outcome="throttled", retry_after=retry_after)
        raise TooManyRequests("Too many failed attempts; wait before trying again.", retry_after=retry_after)


async def forget(db: Database, subjects: Sequence[Subject]) -> None:
    async with db.driver() as conn:
        await store.clear_failures(conn, [(policy.scope, key) for policy, key in subjects])
