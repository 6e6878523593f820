"""Shared steps of the auth tests: codes for a given step, the two-step login over HTTP."""

from __future__ import annotations

import time
from typing import Any

from quart.typing import TestClientProtocol as Client

from app.src.encryption import totp

PROBLEM = "application/problem+json"


def code(secret: str, offset: int = 0) -> str:
    """The TOTP code `offset` steps from now. Tests use steps now and now+1 only: both stay
    inside the ±1 window even if a step boundary passes mid-test."""
    return totp.code_at_step(secret, totp.step_at(time.time()) + offset)


def from_address(address: str) -> dict[str, Any]:
    return {"scope_base": {"client": (address, 40000)}}


async def password_step(client: Client, email: str, password: str, address: str = "192.0.2.1") -> Any:
    return await client.post(
        "/api/auth/login", json={"email": email, "password": password}, **from_address(address)
    )


async def mfa_token(client: Client, email: str, password: str, address: str = "192.0.2.1") -> str:
    response = await password_step(client, email, password, address)
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_json()
    assert body["mfa_required"] is True
    return str(body["mfa_token"])


async def totp_step(client: Client, token: str, second_factor: str, address: str = "192.0.2.1") -> Any:
    return await client.post(
        "/api/auth/login/totp", json={"mfa_token": token, "code": second_factor}, **from_address(address)
    )


async def log_in(client: Client, email: str, password: str, second_factor: str) -> dict[str, str]:
    response = await totp_step(client, await mfa_token(client, email, password), second_factor)
    assert response.status_code == 200, await response.get_data(as_text=True)
    return {"Authorization": f"Bearer {(await response.get_json())['access_token']}"}
