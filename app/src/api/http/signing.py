"""Standard Webhooks signatures of outbound requests, one per active signing secret."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

# the format prefix of signing secrets, not a secret itself
SECRET_PREFIX = "whsec_"  # noqa: S105  # nosec B105


class SigningSecrets(Protocol):
    """The client's active signing secrets (`whsec_<base64>`), newest first; [] sends unsigned."""

    async def __call__(self, client_id: UUID, /) -> list[str]: ...


async def no_signing_secrets(client_id: UUID, /) -> list[str]:
    """No secrets: the default of an OutboundHttp built without a provider (tools and tests); the
    runtime passes the tenants' own (Runtime._signing_secrets)."""
    return []


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret: the base64-decoded part."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a signing secret must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


def sign_delivery(secrets: Sequence[str], *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per
    secret, space-separated (a rotation signs with the old and the new secret)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets
    )
