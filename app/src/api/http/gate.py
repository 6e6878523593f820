"""Per-destination backpressure: host permits held in PostgreSQL and a circuit breaker per host.

The permit count is enforced in the database, so HTTP_HOST_MAX_CONCURRENCY holds across every
worker process. A process first queues its own requests on a local semaphore of the same size (no
database round trip for a wait that would fail anyway), then takes a database permit, retrying
briefly while other processes hold them all. A task that still finds no permit after
HTTP_HOST_PERMIT_WAIT_S is deferred (kinds.Deferred): it goes back to the queue without spending
an attempt, because nothing was sent and the destination did not fail. The same applies while a
host's circuit is open: its tasks wait out the cool-down instead of burning retries on a host
known to be down; after it, one probe request (elected in the database) decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from uuid import UUID

import structlog

from app.src.api.kinds import Deferred
from app.src.database import http as store
from app.src.utils.metrics import HTTP_HOST_UNHEALTHY

if TYPE_CHECKING:
    from app.database import Database

log = structlog.get_logger("taskgate.http")

Verdict = Literal["success", "failure", "neutral"]
DEFER_S = 1.0  # a deferred task comes back after about this long (jittered)
_FIRST_RETRY_S = 0.01
_MAX_RETRY_S = 0.2


@dataclass(slots=True)
class Permit:
    """A held permit; the holder sets `verdict` to tell the circuit what the request showed."""

    host: str
    slot: int
    holder: UUID
    verdict: Verdict = "neutral"


@dataclass(slots=True)
class _Local:
    semaphore: asyncio.Semaphore
    users: int = 0


@dataclass
class HostGate:
    db: Database
    limit: int
    wait_s: float
    circuit_failures: int
    cooldown_s: float
    _local: dict[str, _Local] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def permit(self, host: str, *, holder: UUID, lease_s: float) -> AsyncIterator[Permit]:
        """Hold one of `host`'s permits for the block; raises Deferred when none comes in time.

        The lease outlives the request (its timeout plus a margin), so a process that dies while
        holding a permit frees it when the lease ends.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        local = self._local.setdefault(host, _Local(asyncio.Semaphore(self.limit)))
        local.users += 1
        try:
            await self._wait_local(host, local.semaphore, deadline - loop.time())
            try:
                permit = Permit(host, await self._acquire(host, holder, lease_s, deadline), holder)
                try:
                    yield permit
                finally:
                    await self._release(permit)
            finally:
                local.semaphore.release()
        finally:
            local.users -= 1
            if local.users == 0:
                del self._local[host]

    async def _wait_local(self, host: str, semaphore: asyncio.Semaphore, remaining_s: float) -> None:
        if not semaphore.locked():
            await semaphore.acquire()
            return
        try:
            await asyncio.wait_for(semaphore.acquire(), timeout=max(remaining_s, 0.001))
        except TimeoutError:
            raise self._deferred(f"{host} has {self.limit} requests in flight from this process") from None

    async def _acquire(self, host: str, holder: UUID, lease_s: float, deadline: float) -> int:
        loop = asyncio.get_running_loop()
        delay = _FIRST_RETRY_S
        probing = False
        while True:
            async with self.db.driver() as conn:
                admission = await store.acquire_permit(
                    conn,
                    host=host,
                    holder=holder,
                    limit=self.limit,
                    circuit_failures=self.circuit_failures,
                    lease_s=lease_s,
                )
            if admission.slot is not None:
                return admission.slot
            if admission.tripped and not probing:
                if admission.open:
                    HTTP_HOST_UNHEALTHY.labels(host).set(1)
                    raise self._deferred(
                        f"circuit open: {host} failed {self.circuit_failures} times in a row",
                        after_s=admission.open_for_s + random.uniform(0, DEFER_S),  # noqa: S311  # nosec B311
                    )
                async with self.db.driver() as conn:
                    probing = await store.claim_probe(
                        conn,
                        host=host,
                        holder=holder,
                        circuit_failures=self.circuit_failures,
                        lease_s=lease_s,
                    )
                if not probing:
                    raise self._deferred(f"circuit half-open: another request is probing {host}")
                log.info("probing a host after its cool-down", host=host, task_id=str(holder))
                continue
            if loop.time() + delay > deadline:
                if probing:  # give the probe back: this request never went out
                    await self._release(Permit(host, 0, holder))
                raise self._deferred(f"{host} has {self.limit} requests in flight")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311  # nosec B311
            delay = min(delay * 2, _MAX_RETRY_S)

    async def _release(self, permit: Permit) -> None:
        try:
            async with self.db.driver() as conn:
                released = await store.release_permit(
                    conn,
                    host=permit.host,
                    slot=permit.slot,
                    holder=permit.holder,
                    verdict=permit.verdict,
                    circuit_failures=self.circuit_failures,
                    cooldown_s=self.cooldown_s,
                )
        except Exception as exc:  # the lease frees the permit anyway
            log.warning("releasing a host permit failed", host=permit.host, error=str(exc))
            return
        if released.failures is not None and released.failures >= self.circuit_failures:
            if released.failures == self.circuit_failures:
                log.warning("circuit opened", host=permit.host, cooldown_s=self.cooldown_s)
            HTTP_HOST_UNHEALTHY.labels(permit.host).set(1)
        elif released.healed:
            HTTP_HOST_UNHEALTHY.labels(permit.host).set(0)

    @staticmethod
    def _deferred(reason: str, *, after_s: float | None = None) -> Deferred:
        if after_s is None:  # jitter: deferred tasks do not all come back at once
            after_s = DEFER_S * random.uniform(0.5, 1.5)  # noqa: S311  # nosec B311
        return Deferred(reason, after_s=after_s)

    async def refresh_health(self, *, prune_idle_s: float = 3600.0) -> int:
        """Set the unhealthy gauge from the database (every replica); drop idle host rows."""
        async with self.db.driver() as conn:
            hosts = await store.host_health(conn, circuit_failures=self.circuit_failures)
            await store.prune_hosts(conn, idle_s=prune_idle_s)
        HTTP_HOST_UNHEALTHY.clear()
        for host in hosts:
            HTTP_HOST_UNHEALTHY.labels(host.host).set(1 if host.tripped else 0)
        return sum(1 for host in hosts if host.tripped)
