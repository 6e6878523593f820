"""Operator login: password then TOTP, single-use codes, recovery codes, sessions, no enumeration."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import pytest
import structlog
from quart.typing import TestClientProtocol as Client

from app.database import Database
from app.src.api.auth import operators
from app.src.api.auth.access import transaction
from app.src.api.errors import TooManyRequests
from app.src.api.models.auth import SCOPES, NewOperator
from app.src.database import auth as store
from app.src.encryption import passwords, totp
from tests.conftest import OPERATOR_PASSWORD
from tests.integration.auth.login_steps import (
    PROBLEM,
    code,
    log_in,
    mfa_token,
    password_step,
    totp_step,
)


async def test_password_then_totp_gives_a_session_acting_as_its_own_tenant(
    client: Client, operator: NewOperator
) -> None:
    response = await password_step(client, operator.email.upper(), OPERATOR_PASSWORD)  # email: any case
    assert response.status_code == 200
    body = await response.get_json()
    assert set(body) == {"mfa_required", "mfa_token"}
    assert body["mfa_required"] is True
    answer = await totp_step(client, body["mfa_token"], code(operator.totp_secret))
    assert answer.status_code == 200
    session = await answer.get_json()
    assert session["access_token"].startswith("tgs_")
    assert session["expires_at"]
    me = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {session['access_token']}"})
    assert me.status_code == 200
    assert await me.get_json() == {
        "kind": "operator",
        "client_id": str(operator.user_id),
        "operator_id": str(operator.user_id),
        "email": operator.email,
        "scopes": sorted(SCOPES),
        "key_id": None,
        "max_queued_tasks": None,
    }


async def test_wrong_password_and_unknown_account_are_indistinguishable(
    client: Client, operator: NewOperator, db: Database
) -> None:
    """Same status and body, and comparable timing (one argon2 run either way)."""
    timings: dict[str, list[float]] = {"wrong password": [], "unknown account": []}
    bodies: dict[str, set[str]] = {"wrong password": set(), "unknown account": set()}
    emails = {"wrong password": operator.email, "unknown account": "nobody@example.com"}
    for _ in range(10):
        for case, email in emails.items():
            async with db.driver() as conn:  # keep the throttle out of the measurement
                await conn.execute("DELETE FROM auth_throttle")
            started = time.perf_counter()
            response = await password_step(client, email, "not the password")
            timings[case].append(time.perf_counter() - started)
            assert response.status_code == 401
            assert response.mimetype == PROBLEM
            assert "WWW-Authenticate" not in response.headers
            bodies[case].add(await response.get_data(as_text=True))
    assert bodies["wrong password"] == bodies["unknown account"]
    assert len(bodies["wrong password"]) == 1
    ratio = statistics.median(timings["wrong password"]) / statistics.median(timings["unknown account"])
    assert 0.5 < ratio < 2, f"median timings differ: {timings}"


async def test_failed_logins_on_one_account_are_throttled_by_the_20th(
    client: Client, operator: NewOperator
) -> None:
    statuses = []
    for attempt in range(20):
        # a new address each time: only the per-account counter can trip
        response = await password_step(client, operator.email, "wrong", address=f"198.51.100.{attempt}")
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.mimetype == PROBLEM
            break
    assert 429 in statuses, statuses
    assert set(statuses[:-1]) == {401}
    # while blocked, even the right password is refused before it is checked
    blocked = await password_step(client, operator.email, OPERATOR_PASSWORD, address="198.51.100.200")
    assert blocked.status_code == 429


async def test_failed_logins_from_one_address_are_throttled_by_the_20th(client: Client) -> None:
    statuses = []
    for attempt in range(20):
        response = await password_step(client, f"nobody{attempt}@example.com", "wrong", address="203.0.113.9")
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429, statuses
    other = await password_step(client, "nobody@example.com", "wrong", address="203.0.113.10")
    assert other.status_code == 401  # another address is not affected


async def test_failed_logins_from_one_ipv6_64_are_throttled_together(client: Client) -> None:
    """A host is given a whole /64: a fresh address for every guess must not escape the address's
    throttle (each guess below names an unknown account, so only the address counter can trip)."""
    statuses = []
    for attempt in range(20):
        address = f"2001:db8:1:2::{attempt + 1:x}"
        response = await password_step(client, f"nobody{attempt}@example.com", "wrong", address=address)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429, statuses
    other = await password_step(client, "nobody@example.com", "wrong", address="2001:db8:1:3::1")
    assert other.status_code == 401  # the next /64 is another network


async def test_a_totp_code_is_accepted_once(client: Client, operator: NewOperator) -> None:
    first = code(operator.totp_secret)
    await log_in(client, operator.email, OPERATOR_PASSWORD, first)
    replay = await totp_step(client, await mfa_token(client, operator.email, OPERATOR_PASSWORD), first)
    assert replay.status_code == 401
    assert replay.mimetype == PROBLEM
    # the refused replay did not spend the challenge: the next code still works with it
    await log_in(client, operator.email, OPERATOR_PASSWORD, code(operator.totp_secret, 1))


async def test_six_concurrent_logins_with_one_code_give_exactly_one_session(
    client: Client, operator: NewOperator
) -> None:
    tokens = [await mfa_token(client, operator.email, OPERATOR_PASSWORD) for _ in range(6)]
    same_code = code(operator.totp_secret)
    responses = await asyncio.gather(*(totp_step(client, token, same_code) for token in tokens))
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(200) == 1, statuses
    assert set(statuses) <= {200, 401, 429}


async def test_the_step_guard_holds_across_six_connections(db: Database, operator: NewOperator) -> None:
    step = totp.step_at(time.time())
    start = asyncio.Event()

    async def accept() -> bool:
        async with transaction(db) as conn:
            await start.wait()
            accepted = await store.advance_totp_step(conn, user_id=operator.user_id, step=step)
            await asyncio.sleep(0.05)  # hold the row lock while the others queue on it
            return accepted

    racers = [asyncio.create_task(accept()) for _ in range(6)]
    await asyncio.sleep(0.05)
    start.set()
    assert sorted(await asyncio.gather(*racers)) == [False] * 5 + [True]


async def test_wrong_codes_throttle_the_account(client: Client, operator: NewOperator) -> None:
    token = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
    wrong = "000000" if code(operator.totp_secret) != "000000" else "111111"
    statuses = [(await totp_step(client, token, wrong)).status_code for _ in range(5)]
    assert statuses == [401] * 5
    # the challenge is spent after five wrong codes, and the account is blocked for a while
    assert (await totp_step(client, token, code(operator.totp_secret))).status_code == 401
    fresh = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
    blocked = await totp_step(client, fresh, code(operator.totp_secret))
    assert blocked.status_code == 429
    assert int(blocked.headers["Retry-After"]) >= 1


async def test_mfa_tokens_are_checked(client: Client, operator: NewOperator) -> None:
    for token in ("", "tgm_" + "A" * 43, "tgs_" + "A" * 43, "garbage"):
        response = await totp_step(client, token, code(operator.totp_secret))
        assert response.status_code in (401, 422)
    # an MFA token is not a session token
    token = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
    me = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401


async def test_logout_takes_effect_on_the_next_request(client: Client, operator: NewOperator) -> None:
    headers = await log_in(client, operator.email, OPERATOR_PASSWORD, code(operator.totp_secret))
    assert (await client.get("/api/auth/me", headers=headers)).status_code == 200
    logout = await client.post("/api/auth/logout", headers=headers)
    assert logout.status_code == 200
    after = await client.get("/api/auth/me", headers=headers)
    assert after.status_code == 401
    assert after.mimetype == PROBLEM
    assert (await client.post("/api/auth/logout", headers=headers)).status_code == 401


async def test_reenrolment_issues_single_use_recovery_codes(
    client: Client, operator: NewOperator, operator_headers: dict[str, str]
) -> None:
    enroll = await client.post("/api/auth/totp/enroll", headers=operator_headers)
    assert enroll.status_code == 200
    new_secret = (await enroll.get_json())["secret"]
    assert (await enroll.get_json())["provisioning_uri"].startswith("otpauth://totp/")
    # until confirmed, the old secret still rules
    wrong = await client.post("/api/auth/totp/confirm", json={"code": "000000"}, headers=operator_headers)
    if code(new_secret) != "000000":
        assert wrong.status_code == 422
    confirm = await client.post(
        "/api/auth/totp/confirm", json={"code": code(new_secret)}, headers=operator_headers
    )
    assert confirm.status_code == 200
    recovery = (await confirm.get_json())["recovery_codes"]
    assert len(recovery) == 10
    assert len(set(recovery)) == 10

    await log_in(client, operator.email, OPERATOR_PASSWORD, recovery[0].upper())  # as typed by hand
    reuse = await totp_step(client, await mfa_token(client, operator.email, OPERATOR_PASSWORD), recovery[0])
    assert reuse.status_code == 401
    old = await totp_step(
        client, await mfa_token(client, operator.email, OPERATOR_PASSWORD), code(operator.totp_secret, 1)
    )
    if code(operator.totp_secret, 1) != code(new_secret, 1):
        assert old.status_code == 401
    await log_in(client, operator.email, OPERATOR_PASSWORD, code(new_secret, 1))
    again = await client.post("/api/auth/totp/confirm", json={"code": "123456"}, headers=operator_headers)
    assert again.status_code == 409  # nothing pending any more


async def test_api_clients_cannot_use_operator_routes(client: Client, auth_headers: dict[str, str]) -> None:
    for path in ("/api/auth/logout", "/api/auth/totp/enroll"):
        response = await client.post(path, headers=auth_headers)
        assert response.status_code == 403, path
        assert response.mimetype == PROBLEM
    me = await client.get("/api/auth/me", headers=auth_headers)
    assert me.status_code == 200
    body = await me.get_json()
    assert body["kind"] == "client"
    assert body["scopes"] == sorted(SCOPES)


async def test_missing_malformed_and_unknown_tokens_get_401(
    client: Client, auth_headers: dict[str, str]
) -> None:
    good = auth_headers["Authorization"].removeprefix("Bearer ")
    prefix = good.split("_")[1]
    for header in (
        None,
        "Basic abc",
        "Bearer ",
        "Bearer garbage",
        f"Bearer tg_{prefix}_{'A' * 43}",  # the right prefix with the wrong secret
        f"Bearer tg_{'0' * 16}_{'A' * 43}",
        f"Bearer tgs_{'A' * 43}",
    ):
        headers = {"Authorization": header} if header else {}
        response = await client.get("/api/auth/me", headers=headers)
        assert response.status_code == 401, header
        assert response.mimetype == PROBLEM
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_auth_events_are_logged_without_secrets(client: Client, operator: NewOperator) -> None:
    second_factor = code(operator.totp_secret)
    with structlog.testing.capture_logs() as logs:
        await password_step(client, operator.email, "a wrong password")
        token = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
        response = await totp_step(client, token, second_factor)
        access = (await response.get_json())["access_token"]
    events = [entry["event"] for entry in logs]
    assert "auth.login" in events
    assert "auth.login.totp" in events
    text = repr(logs)
    for secret in (OPERATOR_PASSWORD, "a wrong password", token, access, operator.totp_secret):
        assert secret not in text
    # six digits may turn up inside an id by chance: look for the code as a value instead
    assert all(second_factor not in map(str, entry.values()) for entry in logs)


async def test_parallel_wrong_passwords_are_checked_one_at_a_time(
    client: Client, operator: NewOperator
) -> None:
    """Sent at once, guesses cannot all pass the throttle before the first failure is counted:
    an account is checked for one attempt at a time, the rest are told to retry (429)."""
    responses = await asyncio.gather(
        *(password_step(client, operator.email, f"wrong-{i}", address=f"198.51.100.{i}") for i in range(12))
    )
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) < 5, statuses  # checked: fewer than the free failures
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)
    # and the account is usable again once the burst is over
    await log_in(client, operator.email, OPERATOR_PASSWORD, code(operator.totp_secret))


async def test_parallel_guesses_from_one_address_cannot_outrun_its_limit(
    client: Client, operator: NewOperator, db: Database
) -> None:
    """Sent at once from one address, each at another account (a password spray), guesses all
    passed the address's check before the first failure was counted: 40 of 40 were checked
    against its 10 free failures. Attempts in flight now count against the address."""
    responses = await asyncio.gather(
        *(password_step(client, f"nobody{i}@example.com", "wrong", address="203.0.113.7") for i in range(40))
    )
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= operators.LOGIN_ADDRESS.free_failures, statuses
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)
    # a success is not counted against its address: its charge is taken back
    address = "203.0.113.8"
    for i in range(3):
        assert (await password_step(client, f"other{i}@example.com", "wrong", address)).status_code == 401
    token = await mfa_token(client, operator.email, OPERATOR_PASSWORD, address)
    assert (await totp_step(client, token, code(operator.totp_secret), address)).status_code == 200
    async with db.driver() as conn:
        counts = await conn.fetch("SELECT scope, failures FROM auth_throttle WHERE key = $1", address)
    assert {row["scope"]: row["failures"] for row in counts} == {"login:address": 3, "totp:address": 0}


async def test_parallel_wrong_codes_cannot_outrun_the_code_limit(
    client: Client, operator: NewOperator
) -> None:
    token = await mfa_token(client, operator.email, OPERATOR_PASSWORD)
    right = code(operator.totp_secret)
    wrongs = [f"{(int(right) + 1 + i) % 1_000_000:06d}" for i in range(40)]
    responses = await asyncio.gather(*(totp_step(client, token, wrong) for wrong in wrongs))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {401, 429}, statuses
    assert statuses.count(401) <= 5, statuses  # at most the challenge's five wrong codes were checked


async def test_a_login_abandoned_while_its_password_is_checked_counts_as_a_failure(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that hangs up once its password reached the hasher was never answered, and so
    never counted: from one address, one could keep every argon2 thread busy without ever meeting
    the address's throttle (and no guess is learnt either way)."""
    checking = asyncio.Event()

    async def slow_check(password: str) -> None:
        checking.set()
        await asyncio.sleep(60)  # the argon2 run the client does not wait for

    monkeypatch.setattr(passwords.HASHER, "verify_dummy", slow_check)
    for attempt in range(operators.LOGIN_ADDRESS.free_failures):
        checking.clear()
        login = asyncio.create_task(
            operators.login(db, email=f"nobody{attempt}@example.com", password="x", address="192.0.2.7")
        )
        await asyncio.wait_for(checking.wait(), timeout=5)
        login.cancel()  # the client went away
        with contextlib.suppress(asyncio.CancelledError):
            await login
    with pytest.raises(TooManyRequests):  # refused before any password work
        await asyncio.wait_for(
            operators.login(db, email="nobody@example.com", password="x", address="192.0.2.7"), timeout=5
        )
