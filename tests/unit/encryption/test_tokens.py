"""API keys, opaque tokens, signing secrets and recovery codes."""

import base64

from app.src.encryption import tokens


def test_api_key_format_and_lookup_prefix() -> None:
    key = tokens.new_api_key()
    assert key.token.startswith(f"tg_{key.prefix}_")
    assert tokens.parse_api_key(key.token) == key.prefix
    assert key.digest == tokens.digest(key.token)
    assert len(key.digest) == 32
    assert tokens.new_api_key().token != key.token


def test_malformed_api_keys_have_no_prefix() -> None:
    key = tokens.new_api_key().token
    for bad in ("", "tg_", key[:-1], key + "x", key.replace("tg_", "tk_"), "tgs_" + "a" * 43):
        assert tokens.parse_api_key(bad) is None


def test_opaque_tokens() -> None:
    session = tokens.new_opaque_token(tokens.SESSION_PREFIX)
    assert tokens.opaque_kind(session) == "tgs"
    assert tokens.opaque_kind(tokens.new_opaque_token(tokens.MFA_PREFIX)) == "tgm"
    assert tokens.opaque_kind(tokens.new_api_key().token) is None


def test_constant_time_compare() -> None:
    assert tokens.same(b"abc", b"abc")
    assert tokens.same("abc", b"abc")
    assert not tokens.same(b"abc", b"abd")


def test_signing_secret_is_whsec_base64_of_32_bytes() -> None:
    secret = tokens.new_signing_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


def test_recovery_codes_normalize() -> None:
    code = tokens.new_recovery_code()
    assert len(code) == 19
    assert code.count("-") == 3
    assert tokens.normalize_recovery_code(code.upper().replace("-", " ")) == code
    assert tokens.normalize_recovery_code("123456") is None
    assert tokens.normalize_recovery_code("llll-llll-llll-llll") is None
