"""argon2id at OWASP parameters, off the loop, bounded."""

import asyncio

import argon2
import pytest

from app.src.encryption.passwords import HASHER, HasherBusy, PasswordHasher


def test_parameters_meet_owasp_minimum() -> None:
    params = HASHER.parameters
    assert params.type is argon2.Type.ID
    assert params.memory_cost >= 19_456
    assert params.time_cost >= 2
    assert params.parallelism == 1


async def test_hash_verifies_only_the_right_password() -> None:
    stored = await HASHER.hash("correct horse battery staple")
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert await HASHER.verify(stored, "correct horse battery staple")
    assert not await HASHER.verify(stored, "correct horse battery stapler")
    assert not await HASHER.verify("not-a-hash", "anything")
    assert not HASHER.needs_rehash(stored)


async def test_weaker_hashes_are_flagged_for_rehash() -> None:
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw")
    assert HASHER.needs_rehash(weak)


async def test_hashing_runs_off_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await HASHER.hash("pw")
    task.cancel()
    assert ticks > 3, "the loop stalled while hashing"


async def test_a_flood_beyond_the_queue_is_refused_not_queued() -> None:
    hasher = PasswordHasher(max_concurrent=1, max_waiting=1)
    results = await asyncio.gather(*(hasher.hash("pw") for _ in range(4)), return_exceptions=True)
    busy = [r for r in results if isinstance(r, HasherBusy)]
    done = [r for r in results if isinstance(r, str)]
    assert len(done) == 2  # one running, one waiting
    assert len(busy) == 2
    hasher.shutdown()


async def test_cancelled_waiters_free_their_place_in_the_queue() -> None:
    hasher = PasswordHasher(max_concurrent=1, max_waiting=1)
    first = asyncio.create_task(hasher.hash("pw"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hasher.hash("pw"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await first
    assert await hasher.hash("pw")  # the queue is empty again
    hasher.shutdown()


async def test_an_unknown_account_costs_one_argon2_run_like_a_known_one() -> None:
    """Counted, not timed: every check, the first included, is exactly one argon2 operation."""
    hasher = PasswordHasher()
    stored = await hasher.hash("pw")
    calls: list[str] = []
    real = hasher._hasher

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def hash(self, password: str) -> str:
            calls.append("hash")
            return real.hash(password)

        def verify(self, stored_hash: str, password: str) -> bool:
            calls.append("verify")
            return real.verify(stored_hash, password)

    hasher._hasher = Counting()  # type: ignore[assignment]
    for _ in range(3):
        await hasher.verify_dummy("guess")
    assert calls == ["hash", "verify", "verify"]
    calls.clear()
    assert not await hasher.verify(stored, "guess")
    assert calls == ["verify"]
    hasher.shutdown()
