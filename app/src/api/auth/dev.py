"""Development convenience: a dev operator and a dev API key, issued once, never in production."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from app.database import Database
from app.src.api.auth.clients import create_client
from app.src.api.auth.operators import create_operator
from app.src.api.models.auth import SCOPES
from app.src.database import auth as store

DEV_EMAIL = "dev@taskgate.localhost"
MARKER = "dev-credentials.issued"


@dataclass(frozen=True, slots=True)
class DevCredentials:
    email: str
    password: str
    totp_secret: str
    totp_uri: str
    client_id: UUID
    api_key: str


async def issue_dev_credentials(db: Database, *, data_dir: Path) -> DevCredentials | None:
    """Credentials on the first start of an empty database, else None.

    A marker under DATA_DIR (holding no secret) records that they were shown; the secrets
    themselves exist only in the returned object and, hashed or encrypted, in the database.
    """
    if db.settings.APP_ENV == "prod":
        raise RuntimeError("dev credentials are never issued in production")
    marker = data_dir / MARKER
    if marker.exists():
        return None
    async with db.driver() as conn:
        someone = await store.any_user(conn)
    credentials = None
    if not someone:
        password = secrets.token_urlsafe(18)
        operator = await create_operator(db, email=DEV_EMAIL, password=password)
        _, key = await create_client(db, name="dev", scopes=SCOPES, created_by=operator.user_id)
        credentials = DevCredentials(
            email=operator.email,
            password=password,
            totp_secret=operator.totp_secret,
            totp_uri=operator.totp_uri,
            client_id=key.client_id,
            api_key=key.api_key,
        )
    _write_marker(marker)
    return credentials


def _write_marker(marker: Path) -> None:
    # a few bytes, once per data directory: not worth a thread
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"dev credentials issued at {dt.datetime.now(dt.UTC).isoformat()}\n")
