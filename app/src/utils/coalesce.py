"""Group commit for hot single-row statements: concurrent callers share one round trip.

An API process answering many small requests at once spends more on round trips (pool checkout,
protocol, a commit each) than on the rows themselves. A `Coalescer` runs the first call at once
and lets every call that arrives while that batch is in flight ride in the next one, so under load
N requests cost one statement and when idle a lone request waits for nobody (no timer).

Each caller still gets only its own result, after the statement that carries it has finished:
nothing is acknowledged before it is committed. A batch that fails on a row's data (a constraint
or data error) is split in halves and retried until the bad rows stand alone, so a bad row fails
only its own caller and costs the others a few round trips, not one each.

With a deadline, no caller waits much longer than it: a batch still in flight after the deadline
is abandoned and fails its callers with `on_deadline()`, and a caller queued behind a stuck batch
gives up at its own deadline instead of joining an ever longer queue. A caller whose own batch has
started waits for that batch (bounded by the batch's deadline): giving up then would answer
"not stored" for a row that is being committed, and a client retrying on that answer would store
it twice. A batch abandoned at its deadline may still have stored its rows, as after any timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg

T = TypeVar("T")
R = TypeVar("R")

# errors that belong to one row's data; anything else (connection, timeout) fails the whole batch
_ROW_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)


class Coalescer(Generic[T, R]):
    """`await submit(item)` → the result for that item of `run(batch)` (one result per item, in order).

    One batch is in flight at a time; its round trip is the window in which the next one fills.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 250,
        deadline_s: float | None = None,
        on_deadline: Callable[[], Exception] = TimeoutError,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._deadline_s = deadline_s
        self._on_deadline = on_deadline
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._started: set[asyncio.Future[R]] = set()  # the callers of the batch in flight
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
            self._flusher.add_done_callback(self._flusher_done)
        if self._deadline_s is None:
            return await future
        try:
            # (asyncio.timeout, not wait_for: that wraps the wait in a task of its own, per request)
            async with asyncio.timeout(self._deadline_s):
                return await asyncio.shield(future)
        except TimeoutError:
            if future in self._started:
                return await future  # its batch is running, under a deadline of its own
            future.cancel()  # a batch not yet started drops it
            raise self._on_deadline() from None

    def _flusher_done(self, flusher: asyncio.Task[None]) -> None:
        # a flusher cancelled at shutdown (perhaps before its first step): nobody is left waiting
        if flusher.cancelled():
            for _, future in self._pending:
                future.cancel()
            self._pending = []

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            await asyncio.sleep(0)  # one loop turn: requests that are already parsed join this batch
            while self._pending:
                taken, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                # a caller that went away before its batch started (client disconnected) is dropped
                batch = [(item, future) for item, future in taken if not future.done()]
                self._started = {future for _, future in batch}
                await self._run_batch(batch)
                self._started = set()
        except BaseException as error:  # cancelled mid-batch (the rest: _flusher_done)
            for _, future in batch:
                _settle(future, error=error)
            raise

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        if not batch:
            return
        try:
            items = [item for item, _ in batch]
            if self._deadline_s is None:
                results = await self._run(items)
            else:
                try:
                    async with asyncio.timeout(self._deadline_s):
                        results = await self._run(items)
                except TimeoutError:
                    raise self._on_deadline() from None
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except _ROW_ERRORS as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            middle = len(batch) // 2  # split until the bad rows stand alone; the others go through
            await self._run_batch(batch[:middle])
            await self._run_batch(batch[middle:])
        except asyncio.CancelledError:
            raise
        except Exception as error:
            for _, future in batch:
                _settle(future, error=error)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def close(self, *, timeout_s: float | None = None) -> None:
        """Wait for the batch in flight (on shutdown, after requests have stopped arriving), at
        most `timeout_s`: past it the batch is left to end as its connection is closed under it
        (its callers get the error; nothing they sent was answered as stored)."""
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=timeout_s)


def _settle(future: asyncio.Future[R], *, error: BaseException) -> None:
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):  # the flusher was cancelled (shutdown)
        future.cancel()
    else:
        future.set_exception(error)
