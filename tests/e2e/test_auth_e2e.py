"""Auth over the real HTTPS server: login with both factors, API keys, revocation, no secrets in logs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from app.database import Database
from app.settings import Settings
from app.src.api.auth import operators
from tests.conftest import bearer, make_client
from tests.e2e.conftest import ServerProcess, start_server, wait_ready
from tests.integration.auth.login_steps import code

PASSWORD = "an operator password over https"


@pytest.fixture
def keyed_server(clean_database: str, settings: Settings, tmp_path: Path) -> Iterator[ServerProcess]:
    """The server with the test's SECRET_KEYS, so it can read the TOTP secrets tests store."""
    process = start_server(
        clean_database, tmp_path / "server", env={"SECRET_KEYS": ",".join(settings.SECRET_KEYS)}
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def session(keyed_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=keyed_server.ssl_context())
    async with aiohttp.ClientSession(base_url=keyed_server.base_url, connector=connector) as http:
        await wait_ready(http)
        yield http


async def test_login_keys_and_revocation_over_https(
    keyed_server: ServerProcess, session: aiohttp.ClientSession, db: Database
) -> None:
    operator = await operators.create_operator(db, email="e2e@example.com", password=PASSWORD)
    async with session.post("/api/auth/login", json={"email": operator.email, "password": PASSWORD}) as r:
        assert r.status == 200
        mfa_token = (await r.json())["mfa_token"]
    body = {"mfa_token": mfa_token, "code": code(operator.totp_secret)}
    async with session.post("/api/auth/login/totp", json=body) as r:
        assert r.status == 200
        access_token = (await r.json())["access_token"]
    async with session.get("/api/auth/me", headers=bearer(access_token)) as r:
        assert (await r.json())["client_id"] == str(operator.user_id)

    key = await make_client(db, "e2e")
    async with session.get("/api/auth/me", headers=bearer(key.api_key)) as r:
        assert r.status == 200
    async with session.delete(
        f"/api/auth/clients/{key.client_id}/keys/{key.key_id}", headers=bearer(key.api_key)
    ) as r:
        assert r.status == 200
    async with session.get("/api/auth/me", headers=bearer(key.api_key)) as r:
        assert r.status == 401
        assert r.content_type == "application/problem+json"
    async with session.post("/api/auth/logout", headers=bearer(access_token)) as r:
        assert r.status == 200
    async with session.get("/api/auth/me", headers=bearer(access_token)) as r:
        assert r.status == 401

    keyed_server.stop()
    log = keyed_server.log()
    assert '"event": "auth.login.totp"' in log or '"event":"auth.login.totp"' in log
    for secret in (PASSWORD, mfa_token, access_token, key.api_key, operator.totp_secret):
        assert secret not in log
