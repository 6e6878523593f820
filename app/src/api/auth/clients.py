"""API clients: creation, keys, enable/disable, and the signing secrets their deliveries carry.

Who may do what: an operator (a session, every scope) manages every client; an API client
holding `clients:admin` manages only itself (its keys and signing secrets). Another tenant's id
answers 404, never 403, so ids cannot be probed.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID, uuid4

import structlog

from app.database import Database
from app.src.api import pages
from app.src.api.auth.access import keyring, transaction
from app.src.api.errors import Conflict, Forbidden, NotFound, Unprocessable, problem_type
from app.src.api.models.auth import (
    MAX_QUEUED_TASKS_LIMIT,
    MAX_SIGNING_SECRETS,
    SCOPES,
    ApiClient,
    ApiKeyRecord,
    IssuedKey,
    Principal,
    SigningSecret,
    SigningSecretRecord,
)
from app.src.database import auth as store
from app.src.encryption import tokens
from app.src.encryption.secrets import SIGNING_SECRET, InvalidToken, Keyring

log = structlog.get_logger("taskgate.auth")

DEFAULT_RATE_LIMIT_PER_S = 100.0
NO_SUCH_CLIENT = "No such client."


async def create_client(
    db: Database,
    *,
    name: str,
    scopes: Sequence[str],
    created_by: UUID | None = None,
    max_queued_tasks: int | None = None,
    rate_limit_per_s: float | None = None,
) -> tuple[ApiClient, IssuedKey]:
    """A new client with one API key (returned once, stored as a hash) and one signing secret."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise Unprocessable(f"Unknown scope(s): {', '.join(unknown)}.")
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise Unprocessable("The name must be 1 to 100 characters long.")
    if max_queued_tasks is not None and not 1 <= max_queued_tasks <= MAX_QUEUED_TASKS_LIMIT:
        raise Unprocessable(f"max_queued_tasks must be 1 to {MAX_QUEUED_TASKS_LIMIT}.")
    ring = keyring(db)
    async with transaction(db) as conn:
        client = await store.insert_client(
            conn,
            client_id=uuid4(),
            name=name,
            scopes=sorted(set(scopes), key=SCOPES.index),
            max_queued_tasks=max_queued_tasks,
            rate_limit_per_s=rate_limit_per_s or DEFAULT_RATE_LIMIT_PER_S,
            created_by=created_by,
        )
        key = await _issue_key(conn, client.id)
        await insert_signing_secret(conn, ring, client_id=client.id)
    log.info(
        "auth.client.created",
        target_client_id=str(client.id),
        scopes=client.scopes,
        created_by=str(created_by) if created_by else None,
    )
    return client, key


async def list_clients(
    db: Database, *, principal: Principal, limit: int, cursor: str | None
) -> tuple[list[ApiClient], str | None]:
    """A page of clients, oldest first, and the next page's cursor."""
    after = pages.decode_time_id(cursor) if cursor else None
    async with db.driver() as conn:
        found = await store.list_clients(
            conn, only=None if principal.is_operator else principal.client_id, after=after, limit=limit + 1
        )
    return pages.page(found, limit, lambda c: pages.time_id_key(c.created_at, c.id))


async def get_client(db: Database, *, principal: Principal, client_id: UUID) -> ApiClient:
    async with db.driver() as conn:
        return await _client(conn, principal, client_id)


async def set_disabled(db: Database, *, principal: Principal, client_id: UUID, disabled: bool) -> ApiClient:
    """Disable (every key stops working on the next request) or enable a client; operators only."""
    if not principal.is_operator:
        _visible_or_404(principal, client_id)
        raise Forbidden("Only an operator can disable or enable a client.")
    async with db.driver() as conn:
        client = await store.set_client_disabled(conn, client_id=client_id, disabled=disabled)
    if client is None:
        raise NotFound(NO_SUCH_CLIENT)
    log.info("auth.client.disabled" if disabled else "auth.client.enabled", target_client_id=str(client_id))
    return client


async def issue_key(db: Database, *, principal: Principal, client_id: UUID) -> IssuedKey:
    async with transaction(db) as conn:
        await _client(conn, principal, client_id)
        key = await _issue_key(conn, client_id)
    log.info("auth.key.created", target_client_id=str(client_id), key_id=str(key.key_id))
    return key


async def list_keys(
    db: Database, *, principal: Principal, client_id: UUID, limit: int, cursor: str | None
) -> tuple[list[ApiKeyRecord], str | None]:
    """A page of a client's keys, newest first, and the next page's cursor."""
    after = pages.decode_time_id(cursor) if cursor else None
    async with db.driver() as conn:
        await _client(conn, principal, client_id)
        found = await store.list_keys(conn, client_id=client_id, after=after, limit=limit + 1)
    return pages.page(found, limit, lambda k: pages.time_id_key(k.created_at, k.id))


async def revoke_key(db: Database, *, principal: Principal, client_id: UUID, key_id: UUID) -> ApiKeyRecord:
    """Revoke a key; the next request that presents it gets 401."""
    async with db.driver() as conn:
        await _client(conn, principal, client_id)
        key = await store.revoke_key(conn, client_id=client_id, key_id=key_id)
    if key is None:
        raise NotFound("No such key.")
    log.info("auth.key.revoked", target_client_id=str(client_id), key_id=str(key_id))
    return key


async def list_signing_secrets(db: Database, *, principal: Principal, client_id: UUID) -> list[SigningSecret]:
    async with db.driver() as conn:
        await _tenant(conn, principal, client_id)
        records = await store.active_signing_secrets(conn, client_id=client_id)
    return _decrypted(keyring(db), records)


async def add_signing_secret(db: Database, *, principal: Principal, client_id: UUID) -> list[SigningSecret]:
    """Rotation, step one: a new secret signs alongside the old ones until those are deleted.
    At most MAX_SIGNING_SECRETS are active (each signs every delivery): 409 beyond them."""
    ring = keyring(db)
    async with transaction(db) as conn:
        await _tenant(conn, principal, client_id)
        await store.lock_tenant_secrets(conn, client_id)  # the count below holds until commit
        if len(await store.active_signing_secrets(conn, client_id=client_id)) >= MAX_SIGNING_SECRETS:
            raise Conflict(
                f"A client has at most {MAX_SIGNING_SECRETS} signing secrets (each one signs every "
                "delivery); delete an old one before adding another.",
                type=problem_type("too-many-signing-secrets"),
                title="Too many signing secrets",
            )
        record = await insert_signing_secret(conn, ring, client_id=client_id)
        records = await store.active_signing_secrets(conn, client_id=client_id)
    log.info("auth.signing_secret.created", target_client_id=str(client_id), secret_id=str(record.id))
    return _decrypted(ring, records)


async def delete_signing_secret(
    db: Database, *, principal: Principal, client_id: UUID, secret_id: UUID
) -> list[SigningSecret]:
    """Rotation, step two; returns the secrets still signing. The last one stays: every delivery
    must carry a signature."""
    async with transaction(db) as conn:
        await _tenant(conn, principal, client_id)
        await store.lock_tenant_secrets(conn, client_id)
        active = await store.active_signing_secrets(conn, client_id=client_id)
        if not any(record.id == secret_id for record in active):
            raise NotFound("No such signing secret.")
        if len(active) == 1:
            raise Conflict("This is the client's last signing secret; add a new one before deleting it.")
        await store.delete_signing_secret(conn, client_id=client_id, secret_id=secret_id)
    log.info("auth.signing_secret.deleted", target_client_id=str(client_id), secret_id=str(secret_id))
    return _decrypted(keyring(db), [record for record in active if record.id != secret_id])


async def active_signing_secrets(db: Database, *, client_id: UUID) -> list[str]:
    """The tenant's signing secrets (`whsec_...`), newest first, for signing HTTP deliveries.

    A tenant that has secrets never gets an unsigned delivery: when none of them decrypts with
    SECRET_KEYS (a process started with the wrong keys), this raises, and the delivery attempt fails
    (retried with backoff, dead-lettered once its attempts run out, the reason in last_error)
    instead of going out without a signature.
    """
    async with db.driver() as conn:
        records = await store.active_signing_secrets(conn, client_id=client_id)
    secrets = [secret.secret for secret in _decrypted(keyring(db), records)]
    if records and not secrets:
        raise RuntimeError("none of the client's signing secrets decrypts with this process's SECRET_KEYS")
    return secrets


async def insert_signing_secret(
    conn: store.Connection, ring: Keyring, *, client_id: UUID
) -> SigningSecretRecord:
    return await store.insert_signing_secret(
        conn,
        secret_id=uuid4(),
        client_id=client_id,
        ciphertext=ring.encrypt(SIGNING_SECRET, tokens.new_signing_secret()),
    )


async def _issue_key(conn: store.Connection, client_id: UUID) -> IssuedKey:
    key = tokens.new_api_key()
    record = await store.insert_key(
        conn, key_id=uuid4(), client_id=client_id, prefix=key.prefix, key_hash=key.digest
    )
    return IssuedKey(client_id=client_id, key_id=record.id, api_key=key.token)


def _decrypted(ring: Keyring, records: Sequence[SigningSecretRecord]) -> list[SigningSecret]:
    out = []
    for record in records:
        try:
            secret = ring.decrypt(SIGNING_SECRET, record.secret)
        except InvalidToken:
            # its key left SECRET_KEYS; signing on with the others beats failing every delivery
            log.error("auth.signing_secret.undecryptable", secret_id=str(record.id))
            continue
        out.append(SigningSecret(id=record.id, secret=secret, created_at=record.created_at))
    return out


def _visible_or_404(principal: Principal, client_id: UUID) -> None:
    if not (principal.is_operator or principal.client_id == client_id):
        raise NotFound(NO_SUCH_CLIENT)


async def _client(conn: store.Connection, principal: Principal, client_id: UUID) -> ApiClient:
    _visible_or_404(principal, client_id)
    client = await store.get_client(conn, client_id)
    if client is None:
        raise NotFound(NO_SUCH_CLIENT)
    return client


async def _tenant(conn: store.Connection, principal: Principal, client_id: UUID) -> None:
    """A client, or an operator's own tenant: both own signing secrets."""
    _visible_or_404(principal, client_id)
    if not await store.tenant_exists(conn, client_id):
        raise NotFound(NO_SUCH_CLIENT)
