"""Rotating SECRET_KEYS: prepend a new key and everything made under the old one keeps working."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from cryptography.fernet import Fernet
from quart.typing import TestClientProtocol as Client

from app import create_app
from app.database import Database
from app.settings import Settings
from app.src.api.auth import active_signing_secrets
from app.src.api.auth.rotation import reencrypt_secrets
from app.src.api.models.auth import IssuedKey, NewOperator
from app.src.encryption.secrets import SIGNING_SECRET, TOTP_SECRET, Keyring
from tests.conftest import OPERATOR_PASSWORD, bearer
from tests.integration.auth.login_steps import code, log_in, mfa_token, totp_step


@asynccontextmanager
async def served(settings: Settings, keys: list[str]) -> AsyncIterator[tuple[Client, Database]]:
    app = create_app(settings.model_copy(update={"SECRET_KEYS": keys}))
    async with app.test_app():
        yield app.test_client(), app.extensions["taskgate"].db


async def test_prepending_a_key_keeps_sessions_totp_and_signing_secrets(
    settings: Settings,
    operator: NewOperator,
    operator_headers: dict[str, str],
    api_client: IssuedKey,
    db: Database,
) -> None:
    old = list(settings.SECRET_KEYS)
    new = Fernet.generate_key().decode()
    before = await active_signing_secrets(db, client_id=api_client.client_id)

    async with served(settings, [new, *old]) as (client, rotated_db):
        # sessions and API keys are digests: untouched by the keyring
        assert (await client.get("/api/auth/me", headers=operator_headers)).status_code == 200
        assert (await client.get("/api/auth/me", headers=bearer(api_client.api_key))).status_code == 200
        # the TOTP secret encrypted under the old key still decrypts
        await log_in(client, operator.email, OPERATOR_PASSWORD, code(operator.totp_secret))
        assert await active_signing_secrets(rotated_db, client_id=api_client.client_id) == before
        # new ciphertexts are made with the first key
        url = f"/api/auth/clients/{api_client.client_id}/signing-secrets"
        added = (await (await client.post(url, headers=bearer(api_client.api_key))).get_json())["items"][0]
        async with rotated_db.driver() as conn:
            stored = await conn.fetchval("SELECT secret FROM signing_secrets WHERE id = $1", added["id"])
        assert Keyring([new]).decrypt(SIGNING_SECRET, stored) == added["secret"]

        # finishing the rotation: re-encrypt, after which the old key can go
        result = await reencrypt_secrets(rotated_db)
        assert result.unreadable == 0
        assert result.rotated == 4  # one TOTP secret, three signing secrets (operator's, client's x2)
        async with rotated_db.driver() as conn:
            totp_ciphertext = await conn.fetchval("SELECT totp_secret FROM users")
        assert Keyring([new]).decrypt(TOTP_SECRET, totp_ciphertext) == operator.totp_secret

    async with served(settings, [new]) as (client, new_only_db):
        await log_in(client, operator.email, OPERATOR_PASSWORD, code(operator.totp_secret, 1))
        secrets = await active_signing_secrets(new_only_db, client_id=api_client.client_id)
        assert secrets == [added["secret"], *before]


async def test_a_removed_key_fails_closed(
    settings: Settings, operator: NewOperator, api_client: IssuedKey
) -> None:
    async with served(settings, [Fernet.generate_key().decode()]) as (client, other_db):
        token = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
        refused = await totp_step(client, token, code(operator.totp_secret))
        assert refused.status_code == 401
        # no secret to sign with, and no quiet fallback to unsigned deliveries either
        with pytest.raises(RuntimeError, match="decrypts"):
            await active_signing_secrets(other_db, client_id=api_client.client_id)
