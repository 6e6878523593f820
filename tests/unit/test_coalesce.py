"""Coalescer: callers that arrive together share a batch, yet each sees only its own outcome."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.src.utils.coalesce import Coalescer


class Recorder:
    """A batch function over ints: doubles each; a negative one is bad data; 'down' makes everything fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.down = False

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await asyncio.sleep(0.01)  # a round trip
        if self.down:
            raise ConnectionResetError("database went away")
        if any(i < 0 for i in items):
            raise asyncpg.DataError("bad row")
        return [2 * i for i in items]


async def test_callers_arriving_together_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run, max_batch=50)

    results = await asyncio.gather(*(coalescer.submit(i) for i in range(120)))

    assert results == [2 * i for i in range(120)]
    assert sorted(i for batch in recorder.batches for i in batch) == list(range(120))
    assert len(recorder.batches) <= 4  # one batch in flight, the rest waiting together
    assert max(len(batch) for batch in recorder.batches) == 50


async def test_a_lone_caller_runs_at_once() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    assert await asyncio.wait_for(coalescer.submit(4), timeout=1) == 8
    assert recorder.batches == [[4]]


async def test_a_bad_row_fails_only_its_own_caller() -> None:
    coalescer = Coalescer(Recorder().run)
    outcomes = await asyncio.gather(*(coalescer.submit(i) for i in (11, 12, -1, 14)), return_exceptions=True)
    assert outcomes[:2] == [22, 24]
    assert isinstance(outcomes[2], asyncpg.DataError)
    assert outcomes[3] == 28


async def test_a_failed_round_trip_fails_every_caller_of_that_batch_and_the_next_batch_recovers() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    recorder.down = True
    outcomes = await asyncio.gather(*(coalescer.submit(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(outcome, ConnectionResetError) for outcome in outcomes)
    recorder.down = False
    assert await coalescer.submit(5) == 10


async def test_a_caller_gone_before_its_batch_started_is_not_run() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.001)  # batch [1] is in flight
    gone = asyncio.ensure_future(coalescer.submit(2))
    stays = asyncio.ensure_future(coalescer.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    assert await first == 2
    assert await stays == 6
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recorder.batches == [[1], [3]]


async def test_bad_rows_are_found_by_halving_not_one_round_trip_each() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run, max_batch=64)
    items = [-1 if i == 37 else i for i in range(64)]
    outcomes = await asyncio.gather(*(coalescer.submit(i) for i in items), return_exceptions=True)
    assert [o for o in outcomes if isinstance(o, asyncpg.DataError)] == [outcomes[37]]
    assert [o for i, o in enumerate(outcomes) if i != 37] == [2 * i for i in range(64) if i != 37]
    assert len(recorder.batches) <= 1 + 2 * 6  # the batch, then two halves per level down to one row


async def test_a_flusher_cancelled_at_shutdown_settles_its_callers_and_a_later_submit_still_runs() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    waiting = [asyncio.ensure_future(coalescer.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert coalescer._flusher is not None
    coalescer._flusher.cancel()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert await asyncio.wait_for(coalescer.submit(7), timeout=1) == 14


class Stuck:
    """A batch function whose round trip never returns until released (a stalled network)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.started = 0

    async def run(self, items: list[int]) -> list[int]:
        self.started += 1
        await self.released.wait()
        return items


class Unavailable(Exception):
    pass


async def test_a_batch_past_its_deadline_fails_its_callers_and_nobody_queues_behind_it() -> None:
    stuck = Stuck()
    coalescer = Coalescer(stuck.run, deadline_s=0.2, on_deadline=Unavailable)
    loop = asyncio.get_running_loop()
    began = loop.time()
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.1)  # the first batch is in flight; these arrive behind it
    later = [asyncio.ensure_future(coalescer.submit(i)) for i in range(2, 6)]
    outcomes = await asyncio.gather(first, *later, return_exceptions=True)
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes)
    # each waited at most its own deadline, or its own batch's once that started: not one batch
    # after another (queued 0.1 s in, the second batch starts at 0.2 s and is abandoned at 0.4 s)
    assert loop.time() - began < 0.6

    stuck.released.set()  # the database answers again
    assert await coalescer.submit(7) == 7
    await coalescer.close()


async def test_a_caller_whose_batch_has_started_is_answered_with_its_row() -> None:
    """Queued behind a slow batch, a caller's own deadline passes while its batch is being
    written: it is answered with its row, not told it was not stored."""

    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(0.2)
        return items

    coalescer = Coalescer(slow, deadline_s=0.3, on_deadline=Unavailable)
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0.05)  # behind the first batch: its own starts at 0.2 s and ends at 0.4 s
    assert await coalescer.submit(2) == 2  # its own deadline (0.35 s) passed while it was written
    assert await first == 1
    await coalescer.close()
