"""Authentication: operators, sessions, MFA, API clients and keys, signing secrets, throttling.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCOPES = "'tasks:read','tasks:write','queues:admin','schedules:admin','clients:admin'"


def upgrade() -> None:
    # Operators. TOTP secrets are Fernet ciphertexts (keyring purpose totp-secret); the last
    # accepted time step makes every code single-use (guarded UPDATE ... WHERE totp_last_step < $t).
    op.execute(
        """
        CREATE TABLE users (
            id                  uuid        PRIMARY KEY,
            email               text        NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
            password_hash       text        NOT NULL,
            totp_secret         text        NOT NULL,
            totp_pending_secret text,
            totp_last_step      bigint      NOT NULL DEFAULT 0,
            disabled            boolean     NOT NULL DEFAULT false,
            created_at          timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE UNIQUE INDEX users_email ON users (lower(email))")
    # Session tokens and MFA challenge tokens are stored as SHA-256 digests only.
    op.execute(
        """
        CREATE TABLE sessions (
            id          uuid        PRIMARY KEY,
            user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            token_hash  bytea       NOT NULL UNIQUE,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz NOT NULL,
            revoked_at  timestamptz
        )
        """
    )
    op.execute("CREATE INDEX sessions_user ON sessions (user_id)")
    op.execute("CREATE INDEX sessions_expires ON sessions (expires_at)")
    op.execute(
        """
        CREATE TABLE mfa_challenges (
            token_hash  bytea       PRIMARY KEY,
            user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz NOT NULL,
            failures    integer     NOT NULL DEFAULT 0,
            used_at     timestamptz
        )
        """
    )
    op.execute("CREATE INDEX mfa_challenges_expires ON mfa_challenges (expires_at)")
    op.execute(
        """
        CREATE TABLE recovery_codes (
            user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            code_hash   bytea       NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            used_at     timestamptz,
            PRIMARY KEY (user_id, code_hash)
        )
        """
    )
    # Machine clients (tenants). An API key is tg_<prefix>_<secret>: the prefix finds the row,
    # the SHA-256 of the whole key is compared in constant time.
    op.execute(
        f"""
        CREATE TABLE api_clients (
            id               uuid        PRIMARY KEY,
            name             text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
            scopes           text[]      NOT NULL CHECK (scopes <@ ARRAY[{SCOPES}]::text[]),
            disabled         boolean     NOT NULL DEFAULT false,
            max_queued_tasks integer     CHECK (max_queued_tasks > 0),
            rate_limit_per_s double precision NOT NULL DEFAULT 100 CHECK (rate_limit_per_s > 0),
            created_by       uuid        REFERENCES users (id) ON DELETE SET NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE api_keys (
            id          uuid        PRIMARY KEY,
            client_id   uuid        NOT NULL REFERENCES api_clients (id) ON DELETE CASCADE,
            prefix      text        NOT NULL UNIQUE,
            key_hash    bytea       NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        )
        """
    )
    op.execute("CREATE INDEX api_keys_client ON api_keys (client_id)")
    # Signing secrets belong to a tenant: an API client or an operator acting as its own tenant,
    # so client_id carries no foreign key. Deleted secrets are kept (deleted_at) for audit.
    op.execute(
        """
        CREATE TABLE signing_secrets (
            id          uuid        PRIMARY KEY,
            client_id   uuid        NOT NULL,
            secret      text        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            deleted_at  timestamptz
        )
        """
    )
    op.execute(
        "CREATE INDEX signing_secrets_active ON signing_secrets (client_id, created_at DESC) "
        "WHERE deleted_at IS NULL"
    )
    # Failed login / TOTP attempts per (scope, key): shared by every process, so throttling
    # holds across API replicas.
    op.execute(
        """
        CREATE TABLE auth_throttle (
            scope           text        NOT NULL,
            key             text        NOT NULL,
            failures        integer     NOT NULL,
            last_failure_at timestamptz NOT NULL,
            blocked_until   timestamptz,
            PRIMARY KEY (scope, key)
        )
        """
    )
    op.execute("CREATE INDEX auth_throttle_last_failure ON auth_throttle (last_failure_at)")


def downgrade() -> None:
    for table in (
        "auth_throttle",
        "signing_secrets",
        "api_keys",
        "api_clients",
        "recovery_codes",
        "mfa_challenges",
        "sessions",
        "users",
    ):
        op.execute(f"DROP TABLE {table}")
