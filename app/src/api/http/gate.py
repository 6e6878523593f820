"""Per-destination backpressure: host permits held in PostgreSQL and a circuit breaker per host.

The permit count is enforced in the database, so HTTP_HOST_MAX_CONCURRENCY holds across every
worker process: a permit is one of `limit` slot rows per host, held by a process under a lease
(app/src/database/http.py). Within a process, requests to a host queue on a local semaphore of
the same size, so a process never asks the database for more permits than the limit.

Hand-off: when a request ends and another request of this process waits for the same host, the
slot passes to it without a database round trip (taking and giving back a slot costs two, more
than a request to a nearby destination). A slot goes back to the database when no
local request waits for it, after HANDOFF_MAX_S of hand-offs (so other processes get their turn),
after a failure and while the host has failures (the circuit must see them), and for a probe.
Its lease covers the request's timeout plus that window (and the wait for a connection of the
process's pool, below), so a process that dies frees its slots when their leases end.

A task that finds no permit within HTTP_HOST_PERMIT_WAIT_S is deferred (kinds.Deferred): it
goes back to the queue without spending an attempt, because nothing was sent and the destination
did not fail. So is one whose permit finds none of the process's HTTP_MAX_CONNECTIONS free
within that wait (OutboundHttp.take_connection, delivery._hop). The same applies while a host's
circuit is open: its tasks wait out the cool-down instead of burning retries on a host known to
be down; after it, one probe request (elected in the database) decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from uuid import UUID

import structlog

from app.src.api.kinds import Deferred
from app.src.database import flow as flow_store
from app.src.database import http as store
from app.src.utils.metrics import HTTP_HOST_IN_FLIGHT, HTTP_HOST_LIMIT, HTTP_HOST_UNHEALTHY

if TYPE_CHECKING:
    from app.database import Database

log = structlog.get_logger("taskgate.http")

# What a request showed about its host, for the circuit breaker (neutral: nothing was sent)
HostHealth = Literal["success", "failure", "neutral"]
DEFER_S = 1.0  # a deferred task comes back after about this long (jittered)
HANDOFF_MAX_S = 1.0  # a slot passes between this process's requests for at most this long
_FIRST_RETRY_S = 0.01
_MAX_RETRY_S = 0.2


@dataclass(slots=True)
class Permit:
    """A held permit; the request sets `health` to tell the circuit what it showed."""

    host: str
    slot: int
    task_id: UUID
    health: HostHealth = "neutral"
    probe: bool = False
    throttled: bool = False  # a 429, 503 or timeout: the host asks for less (its limit halves)


@dataclass(slots=True)
class _Slot:
    number: int
    taken_at: float  # loop time when taken from the database
    lease_until: float  # loop time before which the database lease certainly holds


@dataclass(slots=True)
class _Host:
    """This process's requests to one host: the local queue and the slots it holds idle."""

    semaphore: asyncio.Semaphore
    idle: list[_Slot] = field(default_factory=list)
    users: int = 0  # requests waiting for or holding a permit
    waiting: int = 0  # ... of which waiting on the semaphore
    failures: int = 0  # consecutive failures last seen in the database
    limited: bool = False  # the host's adaptive limit is below the full one (every end is written)


@dataclass
class HostGate:
    db: Database
    limit: int
    wait_s: float
    circuit_failures: int
    cooldown_s: float
    process_id: UUID = field(default_factory=uuid.uuid4)  # in http_host_permits.holder
    _hosts: dict[str, _Host] = field(default_factory=dict)
    _callers: set[tuple[UUID, str]] = field(default_factory=set)  # (client, host) pairs recorded

    @contextlib.asynccontextmanager
    async def permit(
        self, host: str, *, task_id: UUID, timeout_s: float, client_id: UUID | None = None
    ) -> AsyncIterator[Permit]:
        """Hold one of `host`'s permits for a request of at most `timeout_s`; raises Deferred when
        none comes within HTTP_HOST_PERMIT_WAIT_S or the host's circuit is open."""
        if client_id is not None and (client_id, host) not in self._callers:
            await self._record_caller(client_id, host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        local = self._hosts.setdefault(host, _Host(asyncio.Semaphore(self.limit)))
        local.users += 1
        try:
            await self._wait_local(host, local, deadline - loop.time())
            try:
                slot, probe = await self._take(host, local, task_id, timeout_s, deadline)
                permit = Permit(host, slot.number, task_id, probe=probe)
                try:
                    yield permit
                finally:
                    await self._give_back(host, local, slot, permit)
            finally:
                local.semaphore.release()
        finally:
            local.users -= 1
            if local.users == 0:
                del self._hosts[host]
                for slot in local.idle:  # nobody here needs them any more
                    await self._release(host, slot.number, task_id, "neutral")

    async def _record_caller(self, client_id: UUID, host: str) -> None:
        """GET /api/hosts shows a client the hosts its tasks called: once per process and pair."""
        try:
            async with self.db.driver() as conn:
                await flow_store.record_client_host(conn, client_id=client_id, host=host)
        except Exception as exc:  # a view, never a reason to fail a delivery
            log.debug("recording a host's caller failed", host=host, error=str(exc))
            return
        if len(self._callers) > 100_000:
            self._callers.clear()
        self._callers.add((client_id, host))

    async def _wait_local(self, host: str, local: _Host, remaining_s: float) -> None:
        if not local.semaphore.locked():
            await local.semaphore.acquire()
            return
        local.waiting += 1
        try:
            await asyncio.wait_for(local.semaphore.acquire(), timeout=max(remaining_s, 0.001))
        except TimeoutError:
            raise self.deferred(f"{host} has {self.limit} requests in flight from this process") from None
        finally:
            local.waiting -= 1

    async def _take(
        self, host: str, local: _Host, task_id: UUID, timeout_s: float, deadline: float
    ) -> tuple[_Slot, bool]:
        loop = asyncio.get_running_loop()
        while local.idle:  # a hand-off: no round trip
            slot = local.idle.pop()
            if slot.lease_until - loop.time() >= timeout_s + self.wait_s:
                return slot, False
            await self._release(host, slot.number, task_id, "neutral")  # too short for this request
        return await self._acquire(host, local, task_id, timeout_s, deadline)

    async def _acquire(
        self, host: str, local: _Host, task_id: UUID, timeout_s: float, deadline: float
    ) -> tuple[_Slot, bool]:
        loop = asyncio.get_running_loop()
        # the wait for a connection of the process's pool, the request, the hand-off window, a margin
        lease_s = self.wait_s + timeout_s + HANDOFF_MAX_S + 10.0
        delay = _FIRST_RETRY_S
        probing = False
        while True:
            asked_at = loop.time()
            async with self.db.driver() as conn:
                admission = await store.acquire_permit(
                    conn,
                    host=host,
                    process_id=self.process_id,
                    task_id=task_id,
                    limit=self.limit,
                    circuit_failures=self.circuit_failures,
                    lease_s=lease_s,
                )
            local.failures = admission.failures
            local.limited = admission.limit_now < self.limit
            if admission.slot is not None:
                return _Slot(admission.slot, asked_at, asked_at + lease_s), probing
            if admission.tripped and not probing:
                if admission.open:
                    HTTP_HOST_UNHEALTHY.labels(host).set(1)
                    raise self.deferred(
                        f"circuit open: {host} failed {admission.failures} times in a row",
                        after_s=admission.open_for_s + random.uniform(0, DEFER_S),  # noqa: S311  # nosec B311
                    )
                async with self.db.driver() as conn:
                    probing = await store.claim_probe(
                        conn,
                        host=host,
                        task_id=task_id,
                        circuit_failures=self.circuit_failures,
                        lease_s=lease_s,
                    )
                if not probing:
                    raise self.deferred(f"circuit half-open: another request is probing {host}")
                log.info("probing a host after its cool-down", host=host, task_id=str(task_id))
                continue
            if loop.time() + delay > deadline:
                if probing:  # give the probe back: this request never went out
                    await self._release(host, 0, task_id, "neutral")
                raise self.deferred(f"{host} has {self.limit} requests in flight")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311  # nosec B311
            delay = min(delay * 2, _MAX_RETRY_S)

    async def _give_back(self, host: str, local: _Host, slot: _Slot, permit: Permit) -> None:
        loop = asyncio.get_running_loop()
        quiet = permit.health == "neutral" or (
            permit.health == "success" and local.failures == 0 and not local.limited
        )
        if (
            quiet
            and not permit.probe
            and local.waiting > len(local.idle)
            and loop.time() - slot.taken_at < HANDOFF_MAX_S
        ):
            local.idle.append(slot)  # the next local request for this host takes it
            return
        await self._release(
            host, slot.number, permit.task_id, permit.health, local, throttled=permit.throttled
        )

    async def _release(
        self,
        host: str,
        slot: int,
        task_id: UUID,
        health: HostHealth,
        local: _Host | None = None,
        *,
        throttled: bool = False,
    ) -> None:
        try:
            async with self.db.driver() as conn:
                released = await store.release_permit(
                    conn,
                    host=host,
                    slot=slot,
                    process_id=self.process_id,
                    task_id=task_id,
                    health=health,
                    circuit_failures=self.circuit_failures,
                    cooldown_s=self.cooldown_s,
                    throttled=throttled,
                    max_concurrency=self.limit,
                )
        except Exception as exc:  # the lease frees the permit anyway
            log.warning("releasing a host permit failed", host=host, error=str(exc))
            return
        if throttled and local is not None:
            local.limited = True
        if released.failures is not None:
            if local is not None:
                local.failures = released.failures
            if released.failures >= self.circuit_failures:
                if released.failures == self.circuit_failures:
                    log.warning("circuit opened", host=host, cooldown_s=self.cooldown_s)
                HTTP_HOST_UNHEALTHY.labels(host).set(1)
        elif released.healed:
            if local is not None:
                local.failures = 0
            HTTP_HOST_UNHEALTHY.labels(host).set(0)

    @staticmethod
    def deferred(reason: str, *, after_s: float | None = None) -> Deferred:
        if after_s is None:  # jitter: deferred tasks do not all come back at once
            after_s = DEFER_S * random.uniform(0.5, 1.5)  # noqa: S311  # nosec B311
        return Deferred(reason, after_s=after_s)

    async def refresh_health(self, *, prune_idle_s: float = 3600.0) -> int:
        """Set the hosts' gauges from the database (every replica): unhealthy, adaptive limit and
        permits in flight; drop idle host rows."""
        async with self.db.driver() as conn:
            hosts = await store.host_health(conn, circuit_failures=self.circuit_failures)
            await store.prune_hosts(conn, idle_s=prune_idle_s)
            views = await flow_store.hosts(
                conn, only=None, max_concurrency=self.limit, circuit_failures=self.circuit_failures
            )
        HTTP_HOST_UNHEALTHY.clear()
        for host in hosts:
            HTTP_HOST_UNHEALTHY.labels(host.host).set(1 if host.tripped else 0)
        HTTP_HOST_LIMIT.clear()
        HTTP_HOST_IN_FLIGHT.clear()
        for view in views:
            HTTP_HOST_LIMIT.labels(view.host).set(view.concurrency_limit)
            HTTP_HOST_IN_FLIGHT.labels(view.host).set(view.in_flight)
        return sum(1 for host in hosts if host.tripped)
