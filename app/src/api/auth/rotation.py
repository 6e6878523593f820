"""Finishing a SECRET_KEYS rotation: re-encrypt every stored secret under the first key.

Prepending a key is enough for everything to keep working (all keys decrypt); this sweep is what
makes removing the old key safe afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from app.database import Database
from app.src.api.auth.access import keyring, transaction
from app.src.database import auth as store
from app.src.encryption.secrets import SIGNING_SECRET, TOTP_SECRET, InvalidToken

log = structlog.get_logger("taskgate.auth")


@dataclass(frozen=True, slots=True)
class Reencrypted:
    rotated: int
    unreadable: int  # made with a key no longer in SECRET_KEYS: left as they are


async def reencrypt_secrets(db: Database) -> Reencrypted:
    ring = keyring(db)
    rotated = unreadable = 0
    async with transaction(db) as conn:
        for user in await store.lock_all_users(conn):
            try:
                secret = ring.rotate(TOTP_SECRET, user.totp_secret)
                pending = (
                    ring.rotate(TOTP_SECRET, user.totp_pending_secret) if user.totp_pending_secret else None
                )
            except InvalidToken:
                unreadable += 1
                log.error("auth.totp.undecryptable", user_id=str(user.id))
                continue
            await store.set_totp_ciphertexts(conn, user_id=user.id, secret=secret, pending=pending)
            rotated += 1
        for record in await store.lock_all_signing_secrets(conn):
            try:
                ciphertext = ring.rotate(SIGNING_SECRET, record.secret)
            except InvalidToken:
                unreadable += 1
                log.error("auth.signing_secret.undecryptable", secret_id=str(record.id))
                continue
            await store.set_signing_ciphertext(conn, secret_id=record.id, ciphertext=ciphertext)
            rotated += 1
    log.info("auth.secrets.reencrypted", rotated=rotated, unreadable=unreadable)
    return Reencrypted(rotated=rotated, unreadable=unreadable)
