"""TOTP step matching: ±1 step of drift, nothing more."""

from urllib.parse import parse_qs, urlparse

import pyotp

from app.src.encryption import totp

NOW = 1_800_000_015.0  # mid-step


def test_current_and_adjacent_steps_match() -> None:
    secret = totp.new_secret()
    step = totp.step_at(NOW)
    assert totp.matching_step(secret, pyotp.TOTP(secret).at(NOW), now=NOW) == step
    assert totp.matching_step(secret, totp.code_at_step(secret, step - 1), now=NOW) == step - 1
    assert totp.matching_step(secret, totp.code_at_step(secret, step + 1), now=NOW) == step + 1


def test_two_steps_away_and_garbage_do_not_match() -> None:
    secret = totp.new_secret()
    step = totp.step_at(NOW)
    for far in (step - 2, step + 2):
        code = totp.code_at_step(secret, far)
        if code not in {totp.code_at_step(secret, s) for s in (step - 1, step, step + 1)}:
            assert totp.matching_step(secret, code, now=NOW) is None
    for bad in ("", "12345", "1234567", "abcdef", " 123456"):
        assert totp.matching_step(secret, bad, now=NOW) is None


def test_provisioning_uri() -> None:
    secret = totp.new_secret()
    uri = urlparse(totp.provisioning_uri(secret, account="ops@example.com"))
    assert uri.scheme == "otpauth"
    assert uri.netloc == "totp"
    query = parse_qs(uri.query)
    assert query["secret"] == [secret]
    assert query["issuer"] == ["Taskgate"]
