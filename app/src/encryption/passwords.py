"""Password hashing with argon2id, off the event loop and bounded so a login flood cannot exhaust memory."""

from __future__ import annotations

import asyncio
import os
import secrets
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# OWASP Password Storage Cheat Sheet, argon2id minimum: m=19 MiB, t=2, p=1. Each hash in flight
# holds MEMORY_COST KiB, so concurrency times this is the memory a flood can cost.
TIME_COST = 2
MEMORY_COST = 19_456
PARALLELISM = 1
MAX_PASSWORD_LENGTH = 1024

T = TypeVar("T")


class HasherBusy(Exception):
    """More hashes are waiting than the hasher accepts; answer 503 rather than queue without bound."""


class PasswordHasher:
    """argon2id in a small thread pool, at most `max_concurrent` at once and `max_waiting` queued.

    argon2-cffi releases the GIL while hashing, so the pool gives real parallelism; the semaphore
    (one per event loop, as asyncio primitives are loop-bound) caps the memory in use.
    """

    def __init__(
        self,
        *,
        time_cost: int = TIME_COST,
        memory_cost: int = MEMORY_COST,
        parallelism: int = PARALLELISM,
        max_concurrent: int | None = None,
        max_waiting: int = 256,
    ) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self.max_concurrent = max_concurrent or max(2, min(8, os.cpu_count() or 2))
        self.max_waiting = max_waiting
        # created on first use: constructing the hasher (at import) must start no thread
        self._executor: ThreadPoolExecutor | None = None
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._waiting = 0
        self._dummy_hash: str | None = None

    @property
    def parameters(self) -> argon2.Parameters:
        return argon2.Parameters(
            type=argon2.Type.ID,
            version=argon2.low_level.ARGON2_VERSION,
            salt_len=self._hasher.salt_len,
            hash_len=self._hasher.hash_len,
            time_cost=self._hasher.time_cost,
            memory_cost=self._hasher.memory_cost,
            parallelism=self._hasher.parallelism,
        )

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, stored_hash: str, password: str) -> bool:
        """True when the password matches; a malformed stored hash is a mismatch, never an error."""

        def check() -> bool:
            try:
                return self._hasher.verify(stored_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await self._run(check)

    async def verify_dummy(self, password: str) -> None:
        """Spend the same work as `verify` for an account that does not exist (no enumeration by timing)."""
        if self._dummy_hash is None:
            # hashing costs what verifying costs, so the first call is no slower than the rest
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
            return
        await self.verify(self._dummy_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.max_concurrent)
        if gate.locked() and self._waiting >= self.max_waiting:
            raise HasherBusy("too many password checks in flight")
        self._waiting += 1
        entered = False
        try:
            async with gate:
                entered = True
                self._waiting -= 1
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.max_concurrent, thread_name_prefix="argon2"
                    )
                return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            if not entered:  # cancelled while waiting for the gate
                self._waiting -= 1

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


# One hasher per process: its pool and semaphores are the process-wide bound.
HASHER = PasswordHasher()
