"""Operators: creation, password then TOTP login, sessions, TOTP re-enrolment and recovery codes.

No database connection is held while a password is hashed: argon2 takes tens of milliseconds,
and a pool slot waiting on it would starve every other request during a login flood.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar
from uuid import UUID, uuid4

import asyncpg
import structlog

from app.database import Database
from app.src.api.auth.access import keyring, transaction
from app.src.api.auth.clients import insert_signing_secret
from app.src.api.auth.throttle import (
    LOGIN_ACCOUNT,
    LOGIN_ADDRESS,
    TOTP_ACCOUNT,
    TOTP_ADDRESS,
    address_key,
    attempt,
    forget,
)
from app.src.api.errors import (
    Conflict,
    Forbidden,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    problem_type,
)
from app.src.api.models.auth import MfaGrant, NewOperator, Principal, SessionGrant, TotpEnrollment, User
from app.src.database import auth as store
from app.src.encryption import tokens, totp
from app.src.encryption.passwords import HASHER, MAX_PASSWORD_LENGTH, HasherBusy
from app.src.encryption.secrets import TOTP_SECRET, InvalidToken

log = structlog.get_logger("taskgate.auth")
T = TypeVar("T")

SESSION_TTL_S = 12 * 3600
MFA_TTL_S = 300
MFA_MAX_FAILURES = 5
RECOVERY_CODE_COUNT = 10
MIN_PASSWORD_LENGTH = 12

WRONG_CREDENTIALS = "The email or password is wrong."
WRONG_CODE = "The code is wrong, expired or already used."
BAD_MFA_TOKEN = "The MFA token is invalid or has expired; log in again."  # noqa: S105  # nosec B105


def account_key(email: str) -> str:
    """The throttling key of an email as typed, whether or not such an account exists."""
    return email.strip().lower()


def _check_new_credentials(email: str, password: str) -> None:
    local, at, domain = email.partition("@")
    if not (at and local and domain) or len(email) > 254 or any(ch.isspace() for ch in email):
        raise Unprocessable("The email address is not valid.")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise Unprocessable(
            f"The password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long."
        )


async def create_operator(db: Database, *, email: str, password: str) -> NewOperator:
    """A new operator with TOTP on from the start (and a signing secret for its own tenant)."""
    email = email.strip()
    _check_new_credentials(email, password)
    password_hash = await _hashing(HASHER.hash(password))
    secret = totp.new_secret()
    ring = keyring(db)
    user_id = uuid4()
    try:
        async with transaction(db) as conn:
            await store.insert_user(
                conn,
                user_id=user_id,
                email=email,
                password_hash=password_hash,
                totp_secret=ring.encrypt(TOTP_SECRET, secret),
            )
            await insert_signing_secret(conn, ring, client_id=user_id)
    except asyncpg.UniqueViolationError:
        raise Conflict("An operator with this email already exists.") from None
    log.info("auth.operator.created", user_id=str(user_id))
    return NewOperator(
        user_id=user_id,
        email=email,
        totp_secret=secret,
        totp_uri=totp.provisioning_uri(secret, account=email),
    )


async def login(db: Database, *, email: str, password: str, address: str) -> MfaGrant:
    """Check the password; on success hand out a short-lived MFA token for the TOTP step.

    A wrong password and an unknown account cost the same (one argon2 verification), answer
    the same 401 and count against the same throttles.
    """
    account = account_key(email)
    subjects = [(LOGIN_ACCOUNT, account), (LOGIN_ADDRESS, address_key(address))]
    async with attempt(db, subjects, event="auth.login") as this:
        async with db.driver() as conn:
            user = await store.get_user_by_email(conn, account)
        if user is None:
            await _hashing(HASHER.verify_dummy(password))
            verified = False
        else:
            verified = await _hashing(HASHER.verify(user.password_hash, password))
        if user is None or not verified or user.disabled:
            this.failed = True
            log.info("auth.login", outcome="failed", email=account, address=address)
            raise Unauthorized(WRONG_CREDENTIALS)
    if HASHER.needs_rehash(user.password_hash):
        rehashed = await _hashing(HASHER.hash(password))
        async with db.driver() as conn:
            await store.set_password_hash(conn, user_id=user.id, password_hash=rehashed)
    mfa_token = tokens.new_opaque_token(tokens.MFA_PREFIX)
    async with db.driver() as conn:
        expires_at = await store.insert_challenge(
            conn, token_hash=tokens.digest(mfa_token), user_id=user.id, ttl_s=MFA_TTL_S
        )
    log.info("auth.login", outcome="mfa_required", user_id=str(user.id), address=address)
    return MfaGrant(mfa_token=mfa_token, expires_at=expires_at)


class _Rejected(Exception):
    pass


async def login_totp(
    db: Database, *, mfa_token: str, code: str, address: str, now: float | None = None
) -> SessionGrant:
    """Second factor: a TOTP code (each time step once per account) or an unused recovery code."""
    if tokens.opaque_kind(mfa_token) != tokens.MFA_PREFIX:
        raise Unauthorized(BAD_MFA_TOKEN)
    token_hash = tokens.digest(mfa_token)
    async with db.driver() as conn:
        challenge = await store.find_challenge(conn, token_hash)
        user = await store.get_user(conn, challenge.user_id) if challenge is not None else None
    if challenge is None or user is None or user.disabled:
        log.info("auth.login.totp", outcome="bad_mfa_token", address=address)
        raise Unauthorized(BAD_MFA_TOKEN)
    subjects = [(TOTP_ACCOUNT, str(user.id)), (TOTP_ADDRESS, address_key(address))]
    async with attempt(db, subjects, event="auth.login.totp") as this:
        step = _matching_step(db, user, user.totp_secret, code, now=now)
        recovery = tokens.normalize_recovery_code(code) if step is None else None
        try:
            async with transaction(db) as conn:
                # The challenge, the step and the session commit together; any refusal rolls all
                # back, so a typo does not burn the challenge and a lost race does not burn the code.
                if not await store.consume_challenge(conn, token_hash):
                    raise _Rejected(BAD_MFA_TOKEN)
                if step is not None:
                    accepted = await store.advance_totp_step(conn, user_id=user.id, step=step)
                elif recovery is not None:
                    accepted = await store.use_recovery_code(
                        conn, user_id=user.id, code_hash=tokens.digest(recovery)
                    )
                else:
                    accepted = False
                if not accepted:
                    raise _Rejected(WRONG_CODE)
                grant = await _start_session(conn, user.id)
        except _Rejected as rejected:
            if rejected.args[0] == WRONG_CODE:
                async with db.driver() as conn:
                    await store.fail_challenge(conn, token_hash, max_failures=MFA_MAX_FAILURES)
                this.failed = True
            log.info("auth.login.totp", outcome="failed", user_id=str(user.id), address=address)
            raise Unauthorized(rejected.args[0]) from None
    await forget(db, [(LOGIN_ACCOUNT, account_key(user.email)), (TOTP_ACCOUNT, str(user.id))])
    log.info(
        "auth.login.totp",
        outcome="ok",
        method="totp" if step is not None else "recovery_code",
        user_id=str(user.id),
        session_id=str(grant.session_id),
        address=address,
    )
    return grant


async def start_session(db: Database, *, user_id: UUID) -> SessionGrant:
    """A session for an operator who has already proven both factors (and for test fixtures)."""
    async with db.driver() as conn:
        return await _start_session(conn, user_id)


async def _start_session(conn: store.Connection, user_id: UUID) -> SessionGrant:
    session_id = uuid4()
    access_token = tokens.new_opaque_token(tokens.SESSION_PREFIX)
    expires_at = await store.insert_session(
        conn,
        session_id=session_id,
        user_id=user_id,
        token_hash=tokens.digest(access_token),
        ttl_s=SESSION_TTL_S,
    )
    return SessionGrant(access_token=access_token, expires_at=expires_at, session_id=session_id)


async def logout(db: Database, *, principal: Principal) -> UUID:
    """Revoke the calling session (its id is returned); the next request with its token gets 401."""
    operator_id, session_id = _operator_session(principal)
    async with db.driver() as conn:
        await store.revoke_session(conn, session_id)
    log.info("auth.logout", user_id=str(operator_id), session_id=str(session_id))
    return session_id


async def operator_email(db: Database, *, principal: Principal) -> str | None:
    if principal.operator_id is None:
        return None
    async with db.driver() as conn:
        user = await store.get_user(conn, principal.operator_id)
    return user.email if user is not None else None


async def enroll_totp(db: Database, *, principal: Principal) -> TotpEnrollment:
    """Start re-enrolment: a new secret, pending until a code from it is confirmed."""
    user = await _operator(db, principal)
    secret = totp.new_secret()
    async with db.driver() as conn:
        await store.set_pending_totp(conn, user_id=user.id, secret=keyring(db).encrypt(TOTP_SECRET, secret))
    log.info("auth.totp.enroll", user_id=str(user.id))
    return TotpEnrollment(secret=secret, provisioning_uri=totp.provisioning_uri(secret, account=user.email))


async def confirm_totp(
    db: Database, *, principal: Principal, code: str, address: str, now: float | None = None
) -> list[str]:
    """Finish re-enrolment with a code from the new secret; returns 10 fresh recovery codes.

    The old secret and every earlier recovery code stop working in the same transaction.
    """
    user = await _operator(db, principal)
    if user.totp_pending_secret is None:
        raise Conflict("No TOTP enrolment is pending; start with POST /api/auth/totp/enroll.")
    subjects = [(TOTP_ACCOUNT, str(user.id)), (TOTP_ADDRESS, address_key(address))]
    async with attempt(db, subjects, event="auth.totp.confirm") as this:
        step = _matching_step(db, user, user.totp_pending_secret, code, now=now)
        if step is None:
            this.failed = True
            log.info("auth.totp.confirm", outcome="failed", user_id=str(user.id))
            raise Unprocessable(
                "The code does not match the new secret.", type=problem_type("invalid-totp-code")
            )
    codes = [tokens.new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
    async with transaction(db) as conn:
        if not await store.confirm_pending_totp(
            conn, user_id=user.id, pending=user.totp_pending_secret, step=step
        ):
            raise Conflict("The enrolment changed meanwhile; start again.")
        await store.replace_recovery_codes(
            conn, user_id=user.id, code_hashes=[tokens.digest(code) for code in codes]
        )
    log.info("auth.totp.confirm", outcome="ok", user_id=str(user.id))
    return codes


async def prune(db: Database) -> dict[str, int]:
    """Housekeeping for the scheduler: expired sessions and challenges, forgotten throttles."""
    async with db.driver() as conn:
        return await store.prune(
            conn, throttle_after_s=LOGIN_ACCOUNT.max_delay_s + LOGIN_ACCOUNT.forget_after_s
        )


def _matching_step(db: Database, user: User, ciphertext: str, code: str, *, now: float | None) -> int | None:
    try:
        secret = keyring(db).decrypt(TOTP_SECRET, ciphertext)
    except InvalidToken:
        # the key that encrypted it left SECRET_KEYS: the operator needs a new enrolment
        log.error("auth.totp.undecryptable", user_id=str(user.id))
        return None
    return totp.matching_step(secret, code.strip(), now=time.time() if now is None else now)


def _operator_session(principal: Principal) -> tuple[UUID, UUID]:
    """(operator id, session id) of an operator session; 403 for anything else."""
    if not principal.is_operator or principal.session_id is None or principal.operator_id is None:
        raise Forbidden("This route needs an operator session.")
    return principal.operator_id, principal.session_id


async def _operator(db: Database, principal: Principal) -> User:
    operator_id, _ = _operator_session(principal)
    async with db.driver() as conn:
        user = await store.get_user(conn, operator_id)
    if user is None:
        raise Unauthorized("The session's operator no longer exists.")
    return user


async def _hashing(work: Awaitable[T]) -> T:
    """Password work, or 503 when the hasher's queue is full: a flood is refused, not queued."""
    try:
        return await work
    except HasherBusy:
        log.warning("auth.hasher.busy")
        raise ServiceUnavailable("Too many logins in progress; try again shortly.", retry_after=1) from None
