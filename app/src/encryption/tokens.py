"""Bearer tokens and API keys: random, stored only as SHA-256, compared in constant time.

These secrets carry 256 bits of entropy, so a fast hash is right (argon2 is for passwords, whose
entropy is low): a stolen table of SHA-256 digests cannot be reversed into working tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

API_KEY_PREFIX = "tg"
SESSION_PREFIX = "tgs"
MFA_PREFIX = "tgm"
_SECRET_BYTES = 32
# tg_<16 hex: indexed lookup id>_<43 base64url chars: 256-bit secret>
_API_KEY = re.compile(r"^tg_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_OPAQUE = re.compile(r"^(tgs|tgm)_([A-Za-z0-9_-]{43})$")


def random_secret() -> str:
    return secrets.token_urlsafe(_SECRET_BYTES)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same(a: bytes | str, b: bytes | str) -> bool:
    """Constant-time equality for secrets and their digests."""
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as issued: `prefix` finds the row (indexed), `digest` is what the row stores."""

    prefix: str
    token: str

    @property
    def digest(self) -> bytes:
        return digest(self.token)


def new_api_key() -> ApiKey:
    prefix = secrets.token_hex(8)
    return ApiKey(prefix=prefix, token=f"{API_KEY_PREFIX}_{prefix}_{random_secret()}")


def parse_api_key(token: str) -> str | None:
    """The lookup prefix of a well-formed API key, else None (no database trip for garbage)."""
    match = _API_KEY.match(token)
    return match.group(1) if match else None


def new_opaque_token(kind: str) -> str:
    """A session (`tgs_`) or MFA challenge (`tgm_`) token; looked up by its digest."""
    if kind not in (SESSION_PREFIX, MFA_PREFIX):
        raise ValueError(f"unknown token kind {kind!r}")
    return f"{kind}_{random_secret()}"


def opaque_kind(token: str) -> str | None:
    match = _OPAQUE.match(token)
    return match.group(1) if match else None


def new_signing_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# Recovery codes: 16 base32 characters (80 bits), shown in groups of four. Stored as SHA-256:
# 80 random bits are out of reach of offline guessing, and a fast hash lets a code be found by
# its digest in one indexed lookup instead of ten argon2 runs.
_RECOVERY_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no l, o, 0, 1: read aloud, typed by hand
_RECOVERY_LENGTH = 16


def new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
    return "-".join(raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4))


def normalize_recovery_code(code: str) -> str | None:
    """The canonical form of a typed recovery code (case, spaces and dashes ignored), else None."""
    raw = re.sub(r"[\s-]", "", code).lower()
    if len(raw) != _RECOVERY_LENGTH or any(ch not in _RECOVERY_ALPHABET for ch in raw):
        return None
    return "-".join(raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4))
