"""The lockout schedule of failed logins and TOTP attempts."""

import pytest

from app.src.api.auth.throttle import (
    LOGIN_ACCOUNT,
    LOGIN_ADDRESS,
    TOTP_ACCOUNT,
    TOTP_ADDRESS,
    Policy,
    lockout_seconds,
)


@pytest.mark.parametrize("policy", [LOGIN_ACCOUNT, LOGIN_ADDRESS, TOTP_ACCOUNT, TOTP_ADDRESS])
def test_every_policy_blocks_before_the_20th_failure(policy: Policy) -> None:
    first_block = next(n for n in range(1, 100) if lockout_seconds(policy, n) > 0)
    assert first_block <= 20


def test_delays_double_then_cap() -> None:
    policy = Policy("test", free_failures=3, base_delay_s=1, max_delay_s=60)
    assert [lockout_seconds(policy, n) for n in range(1, 11)] == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert lockout_seconds(policy, 10_000) == 60  # no overflow for absurd counts


def test_accounts_are_stricter_than_addresses() -> None:
    # an office behind one NAT address shares the address budget
    assert LOGIN_ACCOUNT.free_failures < LOGIN_ADDRESS.free_failures
