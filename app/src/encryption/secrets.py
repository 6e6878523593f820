"""Encryption at rest: a MultiFernet keyring over SECRET_KEYS with one derived key per purpose.

The first SECRET_KEYS entry encrypts, every entry decrypts, so rotation is: prepend a new key,
re-encrypt at leisure (`Keyring.rotate`), then drop the old key. Each entry is stretched with HKDF
into one Fernet key per purpose (info=purpose), so a ciphertext made for TOTP secrets can never be
passed off as a signing secret, and no purpose ever sees the raw configured key.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# purpose labels (HKDF info), not secrets
TOTP_SECRET = "taskgate/totp-secret/v1"  # noqa: S105  # nosec B105
SIGNING_SECRET = "taskgate/signing-secret/v1"  # noqa: S105  # nosec B105
PURPOSES = frozenset({TOTP_SECRET, SIGNING_SECRET})
_SALT = b"taskgate keyring"

__all__ = ["PURPOSES", "SIGNING_SECRET", "TOTP_SECRET", "InvalidToken", "Keyring", "keyring_for"]


class Keyring:
    """Purpose-separated MultiFernet over an ordered list of configured keys."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("SECRET_KEYS is empty: set at least one key")
        self._keys = tuple(keys)
        self._by_purpose = {
            purpose: MultiFernet([Fernet(_derive(key, purpose)) for key in self._keys])
            for purpose in PURPOSES
        }

    def _fernet(self, purpose: str) -> MultiFernet:
        try:
            return self._by_purpose[purpose]
        except KeyError:
            raise ValueError(f"unknown encryption purpose {purpose!r}") from None

    def encrypt(self, purpose: str, plaintext: str) -> str:
        return self._fernet(purpose).encrypt(plaintext.encode()).decode()

    def decrypt(self, purpose: str, ciphertext: str) -> str:
        """The plaintext; raises InvalidToken when no configured key (for this purpose) made it."""
        return self._fernet(purpose).decrypt(ciphertext.encode()).decode()

    def rotate(self, purpose: str, ciphertext: str) -> str:
        """The same plaintext re-encrypted under the first key (for a re-encryption sweep)."""
        return self._fernet(purpose).rotate(ciphertext.encode()).decode()


def _derive(key: str, purpose: str) -> bytes:
    material = key.encode()
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose.encode()).derive(material)
    return base64.urlsafe_b64encode(derived)


@lru_cache(maxsize=8)
def keyring_for(keys: tuple[str, ...]) -> Keyring:
    """One keyring per distinct key list (HKDF runs once per key and purpose, not per call)."""
    return Keyring(keys)
