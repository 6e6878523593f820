"""What every auth service needs from the Database: a transaction and the keyring of SECRET_KEYS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.database import Database
from app.src.encryption.secrets import Keyring, keyring_for


@asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[Any]:
    """An asyncpg connection inside a transaction: commit on success, roll back on error."""
    async with db.driver() as conn, conn.transaction():
        yield conn


def keyring(db: Database) -> Keyring:
    return keyring_for(tuple(db.settings.SECRET_KEYS))
