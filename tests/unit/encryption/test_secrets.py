"""The keyring: purpose separation and rotation of SECRET_KEYS."""

import pytest
from cryptography.fernet import Fernet

from app.src.encryption.secrets import SIGNING_SECRET, TOTP_SECRET, InvalidToken, Keyring

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def test_round_trip_and_no_plaintext_in_ciphertext() -> None:
    ring = Keyring([OLD])
    token = ring.encrypt(TOTP_SECRET, "JBSWY3DPEHPK3PXP")
    assert "JBSWY3DPEHPK3PXP" not in token
    assert ring.decrypt(TOTP_SECRET, token) == "JBSWY3DPEHPK3PXP"


def test_purposes_do_not_decrypt_each_other() -> None:
    ring = Keyring([OLD])
    token = ring.encrypt(TOTP_SECRET, "secret")
    with pytest.raises(InvalidToken):
        ring.decrypt(SIGNING_SECRET, token)


def test_derived_keys_are_not_the_configured_key() -> None:
    token = Keyring([OLD]).encrypt(SIGNING_SECRET, "secret")
    with pytest.raises(InvalidToken):
        Fernet(OLD.encode()).decrypt(token.encode())


def test_rotation_prepend_keeps_old_ciphertexts_readable() -> None:
    old_token = Keyring([OLD]).encrypt(SIGNING_SECRET, "s1")
    rotated = Keyring([NEW, OLD])
    assert rotated.decrypt(SIGNING_SECRET, old_token) == "s1"
    new_token = rotated.encrypt(SIGNING_SECRET, "s2")
    assert Keyring([NEW]).decrypt(SIGNING_SECRET, new_token) == "s2"  # the first key encrypts
    with pytest.raises(InvalidToken):
        Keyring([OLD]).decrypt(SIGNING_SECRET, new_token)
    # re-encrypted under the new key, the old key can go
    assert Keyring([NEW]).decrypt(SIGNING_SECRET, rotated.rotate(SIGNING_SECRET, old_token)) == "s1"
    with pytest.raises(InvalidToken):
        Keyring([NEW]).decrypt(SIGNING_SECRET, old_token)


def test_empty_keyring_and_unknown_purpose_are_refused() -> None:
    with pytest.raises(ValueError, match="SECRET_KEYS"):
        Keyring([])
    with pytest.raises(ValueError, match="purpose"):
        Keyring([OLD]).encrypt("other", "x")
