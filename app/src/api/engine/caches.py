"""In-process caches of the rules an enqueue checks: queue settings and per-client unfinished-task counts.

Changes made through this process invalidate at once; other processes see them within the TTL
(the scheduler's cache job also refreshes them). When an entry expires under load, one query
refreshes it and the concurrent requests wait for that one (no stampede of identical queries).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from uuid import UUID

from app.database import Database
from app.src.api.models.tasks import Queue
from app.src.database import queues as queue_store
from app.src.database import tasks as task_store

QUEUE_TTL_S = 5.0
QUOTA_TTL_S = 2.0

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """At most one load per key in flight; callers asking for the same key meanwhile share it."""

    def __init__(self) -> None:
        self._loading: dict[K, asyncio.Future[V]] = {}

    async def load(self, key: K, loader: Callable[[], Awaitable[V]]) -> V:
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(loader())
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        # shielded: one caller going away (client disconnected) does not cancel the others' load
        return await asyncio.shield(pending)


@dataclass
class QueueCache:
    """Queue settings by (client, name) and by id, created on first use by `ensure`."""

    db: Database
    _by_name: dict[tuple[UUID, str], tuple[float, Queue]] = field(default_factory=dict)
    _by_id: dict[int, tuple[float, Queue]] = field(default_factory=dict)
    _ensuring: SingleFlight[tuple[UUID, str], Queue] = field(default_factory=SingleFlight)

    def clear(self) -> None:
        self._by_name.clear()
        self._by_id.clear()

    def remember(self, queue: Queue) -> Queue:
        stamp = time.monotonic()
        self._by_name[(queue.client_id, queue.name)] = (stamp, queue)
        self._by_id[queue.id] = (stamp, queue)
        return queue

    def forget(self, queue: Queue) -> None:
        self._by_name.pop((queue.client_id, queue.name), None)
        self._by_id.pop(queue.id, None)

    async def ensure(self, *, client_id: UUID, name: str) -> Queue:
        """The queue for enqueueing (created on first use, whatever the cap: for `default`)."""
        hit = self._by_name.get((client_id, name))
        if hit is not None and time.monotonic() - hit[0] < QUEUE_TTL_S:
            return hit[1]

        async def load() -> Queue:
            async with self.db.driver() as conn:
                return self.remember(await queue_store.ensure(conn, client_id=client_id, name=name))

        return await self._ensuring.load((client_id, name), load)

    async def ensure_all(
        self, *, client_id: UUID, names: set[str], cap: int, always: str
    ) -> dict[str, Queue]:
        """The queues for enqueueing, those missing created on first use, all of them or none:
        past the client's `cap` on queues, QueueLimitReached (`always` is created regardless)."""
        now = time.monotonic()
        found = {
            name: hit[1]
            for name in names
            if (hit := self._by_name.get((client_id, name))) is not None and now - hit[0] < QUEUE_TTL_S
        }
        missing = sorted(names - found.keys())

        async def load() -> dict[str, Queue]:
            async with self.db.driver() as conn:
                # one statement for queues that exist (the common case, after the TTL); a
                # transaction only to create, under the client's queue-creation lock
                loaded = await queue_store.get_many(conn, client_id=client_id, names=missing)
                new = [name for name in missing if name not in loaded]
                if new:
                    async with conn.transaction():
                        loaded |= await queue_store.create_within(
                            conn, client_id=client_id, names=new, cap=cap, always=always
                        )
            return {name: self.remember(queue) for name, queue in loaded.items()}

        if len(missing) == 1:  # concurrent enqueues to one queue share its load
            (name,) = missing
            found[name] = await self._ensuring.load((client_id, name), lambda: _one(load, name))
        elif missing:
            found |= await load()
        return found

    async def by_ids(self, ids: set[int]) -> dict[int, Queue]:
        now = time.monotonic()
        found = {
            i: hit[1] for i in ids if (hit := self._by_id.get(i)) is not None and now - hit[0] < QUEUE_TTL_S
        }
        missing = [i for i in ids if i not in found]
        if missing:
            async with self.db.driver() as conn:
                for queue in await queue_store.get_by_ids(conn, missing):
                    found[queue.id] = self.remember(queue)
        return found


@dataclass
class QuotaCache:
    """Approximate unfinished-task counts per client: exact at refresh, plus what we enqueued since,
    plus what is being enqueued right now (reserved between the quota check and the insert, so
    that concurrent enqueues cannot all pass the same check)."""

    db: Database
    _counts: dict[UUID, tuple[float, int]] = field(default_factory=dict)
    _counting: SingleFlight[UUID, int] = field(default_factory=SingleFlight)
    _reserved: dict[UUID, int] = field(default_factory=dict)
    _added: dict[UUID, int] = field(default_factory=dict)  # ever added here, per client

    def clear(self) -> None:
        self._counts.clear()

    async def unfinished(self, client_id: UUID) -> int:
        """Stored and being stored: the count a new enqueue is checked against."""
        return await self._stored(client_id) + self._reserved.get(client_id, 0)

    async def _stored(self, client_id: UUID) -> int:
        hit = self._counts.get(client_id)
        if hit is not None and time.monotonic() - hit[0] < QUOTA_TTL_S:
            return hit[1]

        async def load() -> int:
            # what this process adds while the count is read may or may not be in it: counted
            # again (an over-count until the next refresh) rather than lost
            before = self._added.get(client_id, 0)
            async with self.db.driver() as conn:
                count = await task_store.count_unfinished(conn, client_id=client_id)
            count += self._added.get(client_id, 0) - before
            self._counts[client_id] = (time.monotonic(), count)
            return count

        return await self._counting.load(client_id, load)

    def reserve(self, client_id: UUID, n: int) -> None:
        """Hold `n` of the quota for an enqueue that passed its check (call it with no await in
        between); `release` it once the tasks are stored (and `added`) or refused."""
        self._reserved[client_id] = self._reserved.get(client_id, 0) + n

    def release(self, client_id: UUID, n: int) -> None:
        left = self._reserved.get(client_id, 0) - n
        if left > 0:
            self._reserved[client_id] = left
        else:
            self._reserved.pop(client_id, None)

    def added(self, client_id: UUID, n: int) -> None:
        self._added[client_id] = self._added.get(client_id, 0) + n
        hit = self._counts.get(client_id)
        if hit is not None:
            self._counts[client_id] = (hit[0], hit[1] + n)


async def _one(load: Callable[[], Awaitable[dict[str, Queue]]], name: str) -> Queue:
    return (await load())[name]
