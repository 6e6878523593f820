"""Auth storage: operators, sessions, MFA, recovery codes, clients, keys, signing secrets, throttles.

Every function takes an asyncpg connection (the caller's transaction) and returns the dataclasses
of app.src.api.models.auth. Guards that make something single-use are written into the UPDATE
itself (`... AND used_at IS NULL RETURNING`), never read-then-write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import dacite

from app.src.api.models.auth import (
    ApiClient,
    ApiKeyRecord,
    KeyCredential,
    MfaChallenge,
    SessionCredential,
    SigningSecretRecord,
    User,
)

Connection = Any  # asyncpg.Connection (untyped)
T = TypeVar("T")
_DACITE = dacite.Config(check_types=False)


def _to(cls: type[T], row: Mapping[str, Any] | None) -> T | None:
    return None if row is None else dacite.from_dict(cls, dict(row), config=_DACITE)


def _one(cls: type[T], row: Mapping[str, Any] | None) -> T:
    """The row an INSERT/UPDATE ... RETURNING must produce."""
    if row is None:
        raise RuntimeError(f"expected a {cls.__name__} row")
    return dacite.from_dict(cls, dict(row), config=_DACITE)


def _all(cls: type[T], rows: Sequence[Mapping[str, Any]]) -> list[T]:
    return [dacite.from_dict(cls, dict(row), config=_DACITE) for row in rows]


# ---- operators -------------------------------------------------------------------------------

USER_COLUMNS = (
    "id, email, password_hash, totp_secret, totp_pending_secret, totp_last_step, disabled, created_at"
)


async def insert_user(
    conn: Connection, *, user_id: UUID, email: str, password_hash: str, totp_secret: str
) -> User:
    """Raises asyncpg.UniqueViolationError when the email (case-insensitive) is taken."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO users (id, email, password_hash, totp_secret) VALUES ($1, $2, $3, $4)
        RETURNING {USER_COLUMNS}
        """,
        user_id,
        email,
        password_hash,
        totp_secret,
    )
    return _one(User, row)


async def get_user(conn: Connection, user_id: UUID) -> User | None:
    return _to(User, await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id))


async def get_user_by_email(conn: Connection, email: str) -> User | None:
    # users_email: unique index on lower(email)
    row = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE lower(email) = lower($1)", email)
    return _to(User, row)


async def any_user(conn: Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"))


async def set_password_hash(conn: Connection, *, user_id: UUID, password_hash: str) -> None:
    await conn.execute(
        "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1", user_id, password_hash
    )


async def advance_totp_step(conn: Connection, *, user_id: UUID, step: int) -> bool:
    """Accept a TOTP time step once: true for exactly one caller per (user, step), however many race.

    Concurrent callers queue on the row lock; under READ COMMITTED each re-checks the WHERE
    against the committed row, so only the first sees `totp_last_step < step`.
    """
    row = await conn.fetchrow(
        "UPDATE users SET totp_last_step = $2 WHERE id = $1 AND totp_last_step < $2 RETURNING id",
        user_id,
        step,
    )
    return row is not None


async def set_pending_totp(conn: Connection, *, user_id: UUID, secret: str) -> None:
    await conn.execute(
        "UPDATE users SET totp_pending_secret = $2, updated_at = now() WHERE id = $1", user_id, secret
    )


async def confirm_pending_totp(conn: Connection, *, user_id: UUID, pending: str, step: int) -> bool:
    """Swap in the pending secret if it is still the one the code was checked against.

    The confirming code's step is recorded so that code cannot log in afterwards.
    """
    row = await conn.fetchrow(
        """
        UPDATE users SET totp_secret = totp_pending_secret, totp_pending_secret = NULL,
               totp_last_step = greatest(totp_last_step, $3), updated_at = now()
        WHERE id = $1 AND totp_pending_secret = $2
        RETURNING id
        """,
        user_id,
        pending,
        step,
    )
    return row is not None


async def replace_recovery_codes(conn: Connection, *, user_id: UUID, code_hashes: Sequence[bytes]) -> None:
    await conn.execute("DELETE FROM recovery_codes WHERE user_id = $1", user_id)
    await conn.executemany(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES ($1, $2)",
        [(user_id, code_hash) for code_hash in code_hashes],
    )


async def use_recovery_code(conn: Connection, *, user_id: UUID, code_hash: bytes) -> bool:
    """Spend a recovery code: true once, for one caller, however many race."""
    row = await conn.fetchrow(
        """
        UPDATE recovery_codes SET used_at = now()
        WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL
        RETURNING user_id
        """,
        user_id,
        code_hash,
    )
    return row is not None


async def unused_recovery_codes(conn: Connection, *, user_id: UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL", user_id
        )
    )


# ---- sessions and MFA challenges ---------------------------------------------------------------


async def insert_session(
    conn: Connection, *, session_id: UUID, user_id: UUID, token_hash: bytes, ttl_s: float
) -> datetime:
    expires_at: datetime = await conn.fetchval(
        """
        INSERT INTO sessions (id, user_id, token_hash, expires_at)
        VALUES ($1, $2, $3, now() + make_interval(secs => $4))
        RETURNING expires_at
        """,
        session_id,
        user_id,
        token_hash,
        float(ttl_s),
    )
    return expires_at


async def find_session(conn: Connection, token_hash: bytes) -> SessionCredential | None:
    """A live session of an enabled operator (hot path: sessions.token_hash unique index)."""
    row = await conn.fetchrow(
        """
        SELECT s.id AS session_id, s.token_hash, s.user_id
        FROM sessions s JOIN users u ON u.id = s.user_id
        WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now() AND NOT u.disabled
        """,
        token_hash,
    )
    return _to(SessionCredential, row)


async def revoke_session(conn: Connection, session_id: UUID) -> bool:
    row = await conn.fetchrow(
        "UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id",
        session_id,
    )
    return row is not None


async def insert_challenge(conn: Connection, *, token_hash: bytes, user_id: UUID, ttl_s: float) -> datetime:
    expires_at: datetime = await conn.fetchval(
        """
        INSERT INTO mfa_challenges (token_hash, user_id, expires_at)
        VALUES ($1, $2, now() + make_interval(secs => $3))
        RETURNING expires_at
        """,
        token_hash,
        user_id,
        float(ttl_s),
    )
    return expires_at


async def find_challenge(conn: Connection, token_hash: bytes) -> MfaChallenge | None:
    row = await conn.fetchrow(
        """
        SELECT token_hash, user_id, expires_at, failures FROM mfa_challenges
        WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
        """,
        token_hash,
    )
    return _to(MfaChallenge, row)


async def consume_challenge(conn: Connection, token_hash: bytes) -> bool:
    row = await conn.fetchrow(
        """
        UPDATE mfa_challenges SET used_at = now()
        WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
        RETURNING token_hash
        """,
        token_hash,
    )
    return row is not None


async def fail_challenge(conn: Connection, token_hash: bytes, *, max_failures: int) -> None:
    """Count a wrong code against the challenge; at max_failures it is spent (log in again)."""
    await conn.execute(
        """
        UPDATE mfa_challenges SET failures = failures + 1,
               used_at = CASE WHEN failures + 1 >= $2 THEN now() ELSE used_at END
        WHERE token_hash = $1 AND used_at IS NULL
        """,
        token_hash,
        max_failures,
    )


# ---- API clients and keys ----------------------------------------------------------------------

CLIENT_COLUMNS = "id, name, scopes, disabled, max_queued_tasks, rate_limit_per_s, created_at"
KEY_COLUMNS = "id, client_id, prefix, created_at, revoked_at"


async def insert_client(
    conn: Connection,
    *,
    client_id: UUID,
    name: str,
    scopes: Sequence[str],
    max_queued_tasks: int | None,
    rate_limit_per_s: float,
    created_by: UUID | None,
) -> ApiClient:
    row = await conn.fetchrow(
        f"""
        INSERT INTO api_clients (id, name, scopes, max_queued_tasks, rate_limit_per_s, created_by)
        VALUES ($1, $2, $3, $4, $5, $6)
        RETURNING {CLIENT_COLUMNS}
        """,
        client_id,
        name,
        list(scopes),
        max_queued_tasks,
        rate_limit_per_s,
        created_by,
    )
    return _one(ApiClient, row)


async def get_client(conn: Connection, client_id: UUID) -> ApiClient | None:
    row = await conn.fetchrow(f"SELECT {CLIENT_COLUMNS} FROM api_clients WHERE id = $1", client_id)
    return _to(ApiClient, row)


async def list_clients(
    conn: Connection,
    *,
    only: UUID | None = None,
    after: tuple[datetime, UUID] | None = None,
    limit: int | None = None,
) -> list[ApiClient]:
    """Clients oldest first; `after` (created_at, id) and `limit` make a keyset page. (No index
    on created_at: clients are made by operators, few; the sort is a top-N of them.)"""
    rows = await conn.fetch(
        f"""
        SELECT {CLIENT_COLUMNS} FROM api_clients
        WHERE ($1::uuid IS NULL OR id = $1)
          AND ($2::timestamptz IS NULL OR (created_at, id) > ($2::timestamptz, $3::uuid))
        ORDER BY created_at, id LIMIT $4
        """,
        only,
        None if after is None else after[0],
        None if after is None else after[1],
        limit,
    )
    return _all(ApiClient, rows)


async def set_client_disabled(conn: Connection, *, client_id: UUID, disabled: bool) -> ApiClient | None:
    row = await conn.fetchrow(
        f"""
        UPDATE api_clients SET disabled = $2, updated_at = now() WHERE id = $1
        RETURNING {CLIENT_COLUMNS}
        """,
        client_id,
        disabled,
    )
    return _to(ApiClient, row)


async def insert_key(
    conn: Connection, *, key_id: UUID, client_id: UUID, prefix: str, key_hash: bytes
) -> ApiKeyRecord:
    row = await conn.fetchrow(
        f"""
        INSERT INTO api_keys (id, client_id, prefix, key_hash) VALUES ($1, $2, $3, $4)
        RETURNING {KEY_COLUMNS}
        """,
        key_id,
        client_id,
        prefix,
        key_hash,
    )
    return _one(ApiKeyRecord, row)


async def list_keys(
    conn: Connection, *, client_id: UUID, after: tuple[datetime, UUID] | None = None, limit: int | None = None
) -> list[ApiKeyRecord]:
    """A client's keys newest first (index api_keys_client); `after` (created_at, id) and `limit`
    make a keyset page."""
    rows = await conn.fetch(
        f"""
        SELECT {KEY_COLUMNS} FROM api_keys
        WHERE client_id = $1
          AND ($2::timestamptz IS NULL OR created_at < $2 OR (created_at = $2 AND id > $3::uuid))
        ORDER BY created_at DESC, id LIMIT $4
        """,
        client_id,
        None if after is None else after[0],
        None if after is None else after[1],
        limit,
    )
    return _all(ApiKeyRecord, rows)


async def revoke_key(conn: Connection, *, client_id: UUID, key_id: UUID) -> ApiKeyRecord | None:
    """The revoked key, or None when this client has no such key (revoking twice is not an error)."""
    row = await conn.fetchrow(
        f"""
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
        WHERE id = $1 AND client_id = $2 RETURNING {KEY_COLUMNS}
        """,
        key_id,
        client_id,
    )
    return _to(ApiKeyRecord, row)


async def find_keys(conn: Connection, prefixes: list[str]) -> list[KeyCredential | None]:
    """The live key for each prefix and its client, in order (hot path: api_keys.prefix unique index).

    Many at once: the authenticator looks up the keys of concurrent requests in one round trip.
    """
    rows = await conn.fetch(
        """
        SELECT k.prefix, k.id AS key_id, k.key_hash, c.id AS client_id, c.scopes,
               c.disabled AS client_disabled, c.max_queued_tasks, c.rate_limit_per_s
        FROM api_keys k JOIN api_clients c ON c.id = k.client_id
        WHERE k.prefix = ANY($1::text[]) AND k.revoked_at IS NULL
        """,
        prefixes,
    )
    # built directly, not with dacite: this runs for every request an API key makes
    found = {row["prefix"]: KeyCredential(**{k: v for k, v in row.items() if k != "prefix"}) for row in rows}
    return [found.get(prefix) for prefix in prefixes]


# ---- signing secrets ---------------------------------------------------------------------------

# column names, not a secret
SECRET_COLUMNS = "id, client_id, secret, created_at"  # noqa: S105  # nosec B105


async def tenant_exists(conn: Connection, client_id: UUID) -> bool:
    """An API client or an operator (who acts as its own tenant)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM api_clients WHERE id = $1) "
            "OR EXISTS (SELECT 1 FROM users WHERE id = $1)",
            client_id,
        )
    )


async def insert_signing_secret(
    conn: Connection, *, secret_id: UUID, client_id: UUID, ciphertext: str
) -> SigningSecretRecord:
    row = await conn.fetchrow(
        f"""
        INSERT INTO signing_secrets (id, client_id, secret) VALUES ($1, $2, $3)
        RETURNING {SECRET_COLUMNS}
        """,
        secret_id,
        client_id,
        ciphertext,
    )
    return _one(SigningSecretRecord, row)


async def active_signing_secrets(conn: Connection, *, client_id: UUID) -> list[SigningSecretRecord]:
    """Newest first (signing_secrets_active: partial index on (client_id, created_at DESC))."""
    rows = await conn.fetch(
        f"""
        SELECT {SECRET_COLUMNS} FROM signing_secrets
        WHERE client_id = $1 AND deleted_at IS NULL ORDER BY created_at DESC, id
        """,
        client_id,
    )
    return _all(SigningSecretRecord, rows)


async def delete_signing_secret(conn: Connection, *, client_id: UUID, secret_id: UUID) -> bool:
    row = await conn.fetchrow(
        """
        UPDATE signing_secrets SET deleted_at = now()
        WHERE id = $1 AND client_id = $2 AND deleted_at IS NULL RETURNING id
        """,
        secret_id,
        client_id,
    )
    return row is not None


async def lock_tenant_secrets(conn: Connection, client_id: UUID) -> None:
    """Serialise changes to one tenant's secrets (so 'keep at least one' holds under concurrency)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('signing:' || $1::uuid::text, 0))", client_id
    )


# ---- throttling of failed attempts ---------------------------------------------------------------


async def blocked_for(conn: Connection, keys: Sequence[tuple[str, str]]) -> int:
    """Whole seconds until every (scope, key) given is unblocked; 0 when none is blocked."""
    seconds = await conn.fetchval(
        """
        SELECT ceil(extract(epoch FROM max(t.blocked_until) - now()))::int
        FROM auth_throttle t JOIN unnest($1::text[], $2::text[]) AS k(scope, key)
             ON t.scope = k.scope AND t.key = k.key
        WHERE t.blocked_until > now()
        """,
        [scope for scope, _ in keys],
        [key for _, key in keys],
    )
    return int(seconds or 0)


async def record_failure(conn: Connection, *, scope: str, key: str, forget_after_s: float) -> int:
    """Count one failure; a key quiet for forget_after_s starts again from one. Returns the count."""
    failures: int = await conn.fetchval(
        """
        INSERT INTO auth_throttle AS t (scope, key, failures, last_failure_at) VALUES ($1, $2, 1, now())
        ON CONFLICT (scope, key) DO UPDATE SET
            failures = CASE WHEN t.last_failure_at < now() - make_interval(secs => $3) THEN 1
                            ELSE t.failures + 1 END,
            last_failure_at = now()
        RETURNING failures
        """,
        scope,
        key,
        float(forget_after_s),
    )
    return failures


async def hold(conn: Connection, *, scope: str, key: str, seconds: float) -> bool:
    """Take (scope, key) for one attempt unless it is blocked or held: its blocked_until, for at
    most `seconds`. The row lock of the upsert orders concurrent attempts; one of them wins."""
    row = await conn.fetchrow(
        """
        INSERT INTO auth_throttle AS t (scope, key, failures, last_failure_at, blocked_until)
        VALUES ($1, $2, 0, now(), now() + make_interval(secs => $3))
        ON CONFLICT (scope, key) DO UPDATE SET blocked_until = now() + make_interval(secs => $3)
        WHERE t.blocked_until IS NULL OR t.blocked_until <= now()
        RETURNING 1
        """,
        scope,
        key,
        float(seconds),
    )
    return row is not None


async def charge(
    conn: Connection, *, scope: str, key: str, forget_after_s: float, hold_from: int, hold_s: float
) -> int | None:
    """Count an attempt against (scope, key) as a failure before it is checked (`refund` it if it
    succeeds), unless the key is blocked or held: the count it makes, or None (refused). From the
    `hold_from`-th count on the attempt also holds the key (its blocked_until, for at most
    `hold_s`) until it ends: past its free failures a key is tried one attempt at a time. The row
    lock of the upsert orders concurrent attempts, so they cannot all pass one count."""
    row = await conn.fetchrow(
        """
        INSERT INTO auth_throttle AS t (scope, key, failures, last_failure_at, blocked_until)
        VALUES ($1, $2, 1, now(), CASE WHEN 1 >= $4 THEN now() + make_interval(secs => $5) END)
        ON CONFLICT (scope, key) DO UPDATE SET
            failures = CASE WHEN t.last_failure_at < now() - make_interval(secs => $3) THEN 1
                            ELSE t.failures + 1 END,
            last_failure_at = now(),
            blocked_until = CASE
                WHEN (CASE WHEN t.last_failure_at < now() - make_interval(secs => $3) THEN 1
                           ELSE t.failures + 1 END) >= $4
                THEN now() + make_interval(secs => $5)
                ELSE t.blocked_until END
        WHERE t.blocked_until IS NULL OR t.blocked_until <= now()
        RETURNING failures
        """,
        scope,
        key,
        float(forget_after_s),
        hold_from,
        float(hold_s),
    )
    return None if row is None else int(row["failures"])


async def refund(conn: Connection, *, scope: str, key: str, held: bool) -> None:
    """Take back the failure `charge` counted for an attempt that succeeded (and its hold)."""
    await conn.execute(
        """
        UPDATE auth_throttle
        SET failures = greatest(failures - 1, 0),
            blocked_until = CASE WHEN $3 THEN NULL ELSE blocked_until END
        WHERE scope = $1 AND key = $2
        """,
        scope,
        key,
        held,
    )


async def release(conn: Connection, *, scope: str, key: str, blocked_for_s: float) -> None:
    """End an attempt's hold on (scope, key): blocked for `blocked_for_s` after a failure that
    earned a lockout, else free."""
    await conn.execute(
        """
        UPDATE auth_throttle
        SET blocked_until = CASE WHEN $3 > 0 THEN now() + make_interval(secs => $3) END
        WHERE scope = $1 AND key = $2
        """,
        scope,
        key,
        float(blocked_for_s),
    )


async def clear_failures(conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
    await conn.execute(
        """
        DELETE FROM auth_throttle t USING unnest($1::text[], $2::text[]) AS k(scope, key)
        WHERE t.scope = k.scope AND t.key = k.key
        """,
        [scope for scope, _ in keys],
        [key for _, key in keys],
    )


# ---- housekeeping ------------------------------------------------------------------------------


async def prune(conn: Connection, *, throttle_after_s: float) -> dict[str, int]:
    """Delete expired sessions and challenges and forgotten throttle rows; counts per table."""
    sessions = await conn.fetchval(
        "WITH d AS (DELETE FROM sessions WHERE expires_at < now() - interval '1 day' RETURNING 1) "
        "SELECT count(*) FROM d"
    )
    challenges = await conn.fetchval(
        "WITH d AS (DELETE FROM mfa_challenges WHERE expires_at < now() RETURNING 1) SELECT count(*) FROM d"
    )
    throttles = await conn.fetchval(
        """
        WITH d AS (
            DELETE FROM auth_throttle
            WHERE last_failure_at < now() - make_interval(secs => $1)
              AND (blocked_until IS NULL OR blocked_until < now())
            RETURNING 1
        ) SELECT count(*) FROM d
        """,
        float(throttle_after_s),
    )
    return {"sessions": int(sessions), "mfa_challenges": int(challenges), "auth_throttle": int(throttles)}


# ---- key rotation ------------------------------------------------------------------------------


async def lock_all_users(conn: Connection) -> list[User]:
    return _all(User, await conn.fetch(f"SELECT {USER_COLUMNS} FROM users ORDER BY id FOR UPDATE"))


async def set_totp_ciphertexts(conn: Connection, *, user_id: UUID, secret: str, pending: str | None) -> None:
    await conn.execute(
        "UPDATE users SET totp_secret = $2, totp_pending_secret = $3 WHERE id = $1", user_id, secret, pending
    )


async def lock_all_signing_secrets(conn: Connection) -> list[SigningSecretRecord]:
    rows = await conn.fetch(f"SELECT {SECRET_COLUMNS} FROM signing_secrets ORDER BY id FOR UPDATE")
    return _all(SigningSecretRecord, rows)


async def set_signing_ciphertext(conn: Connection, *, secret_id: UUID, ciphertext: str) -> None:
    await conn.execute("UPDATE signing_secrets SET secret = $2 WHERE id = $1", secret_id, ciphertext)
