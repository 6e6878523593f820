"""The lockout schedule of failed logins and TOTP attempts, and what an address is throttled as."""

import pytest

from app.src.api.auth.throttle import (
    LOGIN_ACCOUNT,
    LOGIN_ADDRESS,
    TOTP_ACCOUNT,
    TOTP_ADDRESS,
    Policy,
    address_key,
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


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # an IPv4 client of a dual-stack listener
        ("unknown", "unknown"),
    ],
)
def test_an_address_is_throttled_as_its_ipv4_address_or_ipv6_64(address: str, key: str) -> None:
    assert address_key(address) == key
