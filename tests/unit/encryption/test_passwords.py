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


async def test_the_dummy_check_costs_what_a_real_check_costs() -> None:
    import time

    hasher = PasswordHasher()
    stored = await hasher.hash("pw")

    async def timed(work: object) -> float:
        started = time.perf_counter()
        await work  # type: ignore[misc]
        return time.perf_counter() - started

    first_dummy = await timed(hasher.verify_dummy("guess"))  # includes making the dummy hash
    dummy = sorted([await timed(hasher.verify_dummy("guess")) for _ in range(3)])[1]
    real = sorted([await timed(hasher.verify(stored, "guess")) for _ in range(3)])[1]
    assert 0.5 < dummy / real < 2
    assert first_dummy / real < 1.6  # not hash-then-verify (2x) on the first unknown account
    hasher.shutdown()
