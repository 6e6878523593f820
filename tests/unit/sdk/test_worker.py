"""The SDK's remote Worker against an in-memory Taskgate that holds it to the server's contract:
what a handler's outcome becomes, and that nothing one task does stalls the others."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from tests.conftest import ROOT
from tests.unit.sdk.fake_taskgate import FakeTaskgate, until

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate


class Number(BaseModel):
    n: int


async def test_a_validation_error_the_handler_raises_is_not_blamed_on_its_result() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("parse", result=Number)
        async def parse(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Number:
            if payload.get("raw") is not None:
                Number.model_validate({"n": payload["raw"]})  # the handler's own parsing fails
            return {"n": "not a number"}  # type: ignore[return-value]

        own = server.add("parse", {"raw": "x"})
        wrong = server.add("parse")
        async with server.serving(worker):
            await until(lambda: {own, wrong} <= server.completed.keys())
    assert server.completed[own]["outcome"] == "failed"
    assert server.completed[own]["error"].startswith("ValidationError: ")
    assert "traceback" in server.completed[own]
    assert server.completed[wrong]["error"].startswith("result does not match the result model of 'parse'")


async def test_completions_the_server_would_refuse_never_hold_back_the_others() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=10, grace_s=1)
        started: list[str] = []
        together = asyncio.Event()  # every handler ends at once: one completion batch

        async def started_all() -> None:
            started.append("")
            if len(started) == 8:
                together.set()
            await together.wait()

        @worker.kind("ok")
        async def ok(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            await started_all()
            return {"n": 1}

        @worker.kind("loud")
        async def loud(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            await started_all()
            raise ValueError("x" * 50_000)

        @worker.kind("unencodable")
        async def unencodable(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            await started_all()
            return {"tags": {"a", "b"}}

        @worker.kind("bad_spawn")
        async def bad_spawn(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> list[Any]:
            await started_all()
            child = await ctx.spawn("ok", {}, key="child", priority=10)  # the server takes 0-9
            return await ctx.gather([child])

        @worker.kind("long_sleep")
        async def long_sleep(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            await started_all()
            await ctx.sleep("nap", 400 * 86_400)  # the server takes at most 366 days

        fine = [server.add("ok") for _ in range(4)]
        loud_id, unencodable_id = server.add("loud"), server.add("unencodable")
        bad_spawn_id, long_sleep_id = server.add("bad_spawn"), server.add("long_sleep")
        async with server.serving(worker):
            await until(lambda: len(server.completed) == 8)
    done = server.completed
    assert [done[f]["outcome"] for f in fine] == ["completed"] * 4
    assert done[loud_id]["outcome"] == "failed"
    assert done[loud_id]["error"].startswith("ValueError: xxx")
    assert len(done[loud_id]["error"]) == 20_000  # the server's limit
    assert done[unencodable_id]["outcome"] == "failed"
    assert "cannot be encoded as JSON: TypeError" in done[unencodable_id]["error"]
    assert done[bad_spawn_id]["outcome"] == "permanent_failure"  # a replay would ask the same
    assert done[bad_spawn_id]["error"].startswith("completion refused: 422")
    assert len(server.refused) <= 8  # halving down to the refused item, not retrying for ever
    # a sleep the server could never store fails for good before it is sent (test_sdk_steps.py)
    assert done[long_sleep_id]["outcome"] == "permanent_failure"
    assert "it may be at most 31622400 s (366 days)" in done[long_sleep_id]["error"]


async def test_completions_are_batched_within_the_servers_body_cap() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=4, grace_s=1)
        together = asyncio.Barrier(4)

        @worker.kind("blob")
        async def blob(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            await together.wait()
            return {"blob": "x" * payload["size"]}

        three_mib = [server.add("blob", {"size": 3 * 1024 * 1024}) for _ in range(3)]
        too_big = server.add("blob", {"size": 9 * 1024 * 1024})
        async with server.serving(worker):
            await until(lambda: len(server.completed) == 4)
    assert [server.completed[t]["outcome"] for t in three_mib] == ["completed"] * 3
    assert server.completed[too_big]["outcome"] == "failed"
    assert "bytes of JSON" in server.completed[too_big]["error"]
    assert server.refused == []


async def test_completions_are_batched_within_the_servers_bound_on_suspended_work() -> None:
    """The server takes at most 10,000 spawned children and 1,000 steps in one complete request:
    three tasks that each spawn 4,000 go in two requests, none refused (a refused batch is split
    in halves, a round trip each, before the bad item alone is failed)."""
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=3, grace_s=1)
        together = asyncio.Barrier(3)

        @worker.kind("fan")
        async def fan(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            children = [await ctx.spawn("leaf", {}, key=f"c{i}") for i in range(4000)]
            await together.wait()
            await ctx.gather(children)

        fans = [server.add("fan") for _ in range(3)]
        async with server.serving(worker):
            await until(lambda: len(server.completed) == 3)
    assert [server.completed[t]["outcome"] for t in fans] == ["suspended"] * 3
    assert [len(server.completed[t]["suspend"]["spawn"]) for t in fans] == [4000] * 3
    assert server.refused == []


async def test_a_completion_refused_twice_is_dropped_and_the_worker_goes_on() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1)

        @worker.kind("ok")
        async def ok(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {}

        doomed = server.add("ok")
        server.refuse_item = lambda item: item["id"] == doomed  # in any form
        later = [server.add("ok") for _ in range(3)]
        async with server.serving(worker):  # one slot: the dropped completion must free it
            await until(lambda: set(later) <= server.completed.keys())
    assert doomed not in server.completed
    assert server.refused == [("/api/workers/complete", 422)] * 2


async def test_progress_that_cannot_be_sent_never_costs_the_leases() -> None:
    server = FakeTaskgate(lease_s=3)  # heartbeats every second; a lease unconfirmed for 2 s is given up
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=3, grace_s=1)
        refused: list[str] = []

        @worker.kind("report")
        async def report(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            try:
                ctx.progress({"handle": object()})
            except TypeError as exc:
                refused.append(str(exc))
            if payload["progress"] == "nul":
                ctx.progress({"note": "a\x00b"})  # the server refuses a NUL (422)
            for _ in range(8):  # longer than the lease: only heartbeats keep it
                if payload["progress"] == "datetime":
                    ctx.progress({"at": datetime.now(UTC)})
                await asyncio.sleep(0.5)
            return {}

        dated = server.add("report", {"progress": "datetime"})
        refused_by_server = server.add("report", {"progress": "nul"})
        async with server.serving(worker):
            await until(lambda: len(server.completed) == 2, timeout_s=10)
    assert [server.completed[t]["outcome"] for t in (dated, refused_by_server)] == ["completed"] * 2
    assert len(refused) == 2  # the handler itself is told
    sent = [b["progress"] for b in server.heartbeats if b.get("progress")]
    assert sent  # progress with a datetime is sent; the one refused was dropped (with that heartbeat's)
    assert all(list(p) == [dated] and isinstance(p[dated]["at"], str) for p in sent)


async def test_a_worker_holding_more_than_a_thousand_tasks_keeps_every_lease() -> None:
    server = FakeTaskgate(lease_s=3)
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1500, grace_s=1)
        release = asyncio.Event()

        @worker.kind("hold")
        async def hold(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            await release.wait()
            return {}

        held = {server.add("hold") for _ in range(1200)}
        async with server.serving(worker):
            await until(lambda: not server.available)
            await until(lambda: held <= {i for b in server.heartbeats for i in b["task_ids"]})
            release.set()
            await until(lambda: len(server.completed) == 1200)
    assert server.refused == []
    assert all(c["outcome"] == "completed" for c in server.completed.values())  # none was fenced


async def test_a_handler_is_stopped_before_its_lease_ends_even_while_a_heartbeat_hangs() -> None:
    server = FakeTaskgate(lease_s=4)  # given up 1 s before the end when unconfirmed
    server.hang_heartbeats = True  # each heartbeat then waits a third of the lease for nothing
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=20, grace_s=1)
        stopped: dict[str, float] = {}

        @worker.kind("long")
        async def long(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            try:
                await asyncio.sleep(30)
            finally:
                stopped[str(ctx.task_id)] = time.monotonic()

        async with server.serving(worker):
            # claimed 0.15 s apart: their deadlines fall at every phase of the heartbeats
            for _ in range(12):
                server.add("long")
                await asyncio.sleep(0.15)
            await until(lambda: len(stopped) == 12, timeout_s=10)
    late = {t: round(stopped[t] - server.expires[t], 2) for t in stopped if stopped[t] >= server.expires[t]}
    assert late == {}  # task id -> seconds its handler ran past its lease


async def test_an_abandoned_sync_handler_keeps_its_slot_and_its_task_never_runs_twice_at_once() -> None:
    server = FakeTaskgate(lease_s=3)
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)
        release = threading.Event()
        lock = threading.Lock()
        active: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        contexts: list[taskgate.TaskContext] = []
        started: list[tuple[str, int, bool]] = []  # (task, attempt, released already)

        @worker.kind("block")
        def block(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            with lock:
                contexts.append(ctx)
                started.append((payload["name"], ctx.attempt, release.is_set()))
                active[payload["name"]] += 1
                peak[payload["name"]] = max(peak[payload["name"]], active[payload["name"]])
            release.wait(10)  # does not look at ctx.cancelled, as too many handlers don't
            with lock:
                active[payload["name"]] -= 1
            return {"attempt": ctx.attempt}

        a = server.add("block", {"name": "a"})
        server.lost.add(a)  # the first heartbeat says its lease is lost
        async with server.serving(worker):
            await until(lambda: bool(contexts) and contexts[0].cancelled)
            server.lost.clear()
            server.add("block", {"name": "a"}, task_id=a, attempt=2)  # the server hands it out again
            b = server.add("block", {"name": "b"})
            await until(lambda: a not in {t["id"] for t in server.available})  # claimed again
            await asyncio.sleep(0.3)
            release.set()
            await until(lambda: {a, b} <= server.completed.keys())
    assert peak["a"] == 1
    assert server.completed[a]["outcome"] == "completed"
    assert server.completed[a]["result"] == {"attempt": 2}
    assert ("a", 2, True) in started  # the second attempt ran once the first had returned
    assert ("b", 1, True) in started  # the abandoned run's slot stayed taken until then


async def test_a_heartbeat_answered_late_never_abandons_a_newer_run_of_its_task() -> None:
    """A heartbeat sent while attempt 1 ran, answered (lost) only after that attempt completed and
    attempt 2 of the same task was claimed here, abandoned attempt 2: its lease ran out unused and
    the task was retried once more (or discarded, on its last attempt) though nothing failed."""

    class LateHeartbeat(FakeTaskgate):
        def __init__(self) -> None:
            super().__init__(lease_s=6)
            self.target = ""
            self.held = asyncio.Event()
            self.release = asyncio.Event()
            self.answered = asyncio.Event()

        async def _heartbeat(self, body: dict[str, Any]) -> Any:
            if self.target in body["task_ids"] and not self.held.is_set():
                self.held.set()
                await self.release.wait()
                self.answered.set()
                # processed after attempt 1 completed: the task was not running then
                return httpx.Response(200, json={"items": [], "lost": [self.target]})
            return await super()._heartbeat(body)

    server = LateHeartbeat()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)
        second_started, gate = asyncio.Event(), asyncio.Event()
        contexts: list[taskgate.TaskContext] = []

        @worker.kind("job")
        async def job(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            contexts.append(ctx)
            if ctx.attempt == 1:
                await server.held.wait()  # the heartbeat naming this attempt is on its way
                raise taskgate.RetryLater("again", after_s=0)
            second_started.set()
            await gate.wait()
            return {"attempt": ctx.attempt}

        server.target = server.add("job")
        async with server.serving(worker):
            await until(lambda: server.completed.get(server.target, {}).get("outcome") == "failed")
            server.add("job", task_id=server.target, attempt=2)
            await asyncio.wait_for(second_started.wait(), 5)
            server.release.set()
            await asyncio.wait_for(server.answered.wait(), 5)
            await asyncio.sleep(0.1)  # the answer is read
            gate.set()
            await until(lambda: server.completed[server.target].get("attempt") == 2)
    assert server.completed[server.target]["outcome"] == "completed"
    assert contexts[1].cancelled is False


async def test_a_task_claimed_at_the_end_of_a_long_poll_runs() -> None:
    """The leases of a claim were reckoned from when the claim was sent: a task that arrived late
    in a long-poll (after lease minus margin: 24 s into a 30 s wait with the default 30 s lease,
    8 s into the default 10 s wait with a 10 s lease) was claimed already unconfirmed and abandoned
    at once, its lease left to expire unused, attempt after attempt."""

    class LongPoll(FakeTaskgate):
        async def _claim(self, body: dict[str, Any]) -> Any:
            deadline = time.monotonic() + body["wait_s"]
            while not self.available and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return await super()._claim(body)

    server = LongPoll(lease_s=3)  # fenced 1 s (the smallest margin) before the lease ends
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1, wait_s=2.8)
        contexts: list[taskgate.TaskContext] = []

        @worker.kind("job")
        async def job(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            contexts.append(ctx)
            await asyncio.sleep(0.8)  # past the first fence after the claim
            return {"ran": True}

        async with server.serving(worker):
            await asyncio.sleep(2.3)  # into the worker's first long-poll, past lease minus margin
            task_id = server.add("job")
            await until(lambda: task_id in server.completed, timeout_s=5)
    assert server.completed[task_id]["outcome"] == "completed"
    assert [ctx.cancelled for ctx in contexts] == [False]


async def test_on_shutdown_a_handler_that_stopped_hands_its_task_back_and_one_still_running_does_not() -> (
    None
):
    """After the grace period a stopped handler's task is handed back with an empty suspension
    (available again, its failure budget untouched: a last attempt is not discarded); a sync
    handler that ignores `ctx.cancelled` is never handed back while it runs (it would run twice)."""
    server = FakeTaskgate()
    stubborn_may_end = threading.Event()
    started: set[str] = set()
    try:
        async with server.client() as client:
            worker = taskgate.Worker(client, concurrency=4, grace_s=0.3)

            @worker.kind("slow_async")
            async def slow_async(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
                started.add(str(ctx.task_id))
                await asyncio.sleep(60)

            @worker.kind("polite_sync")
            def polite_sync(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
                started.add(str(ctx.task_id))
                ctx.wait_cancelled(60)
                return {}

            @worker.kind("stubborn_sync")
            def stubborn_sync(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
                started.add(str(ctx.task_id))
                stubborn_may_end.wait(60)  # never looks at ctx.cancelled
                return {}

            stopped_async = server.add("slow_async")
            stopped_sync = server.add("polite_sync")
            running = server.add("stubborn_sync")
            async with server.serving(worker):
                await until(lambda: len(started) == 3)
    finally:
        stubborn_may_end.set()
    for task_id in (stopped_async, stopped_sync):
        handed_back = server.completed[task_id]
        assert handed_back["outcome"] == "suspended"
        assert not handed_back.get("suspend")  # nothing to wait for: available at once
    assert running not in server.completed  # left to its lease while its handler runs


async def test_a_completion_the_server_fails_for_ever_is_given_up_and_its_lease_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A completion answered 500 every time is retried only so long: then the heartbeats stop
    renewing its lease (Taskgate rescues and retries the task) and its slot is free again."""
    monkeypatch.setattr(taskgate.worker, "DELIVER_FOR_S", 1.0)
    server = FakeTaskgate(lease_s=3)  # a heartbeat every second, a fence 2 s after the last
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1)

        @worker.kind("quick")
        async def quick(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {}

        @worker.kind("next")
        async def next_one(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            mine = str(ctx.task_id)
            await until(lambda: any(mine in beat["task_ids"] for beat in server.heartbeats))
            return {}

        broken = server.add("quick")
        server.break_item = lambda item: item["id"] == broken
        after = server.add("next")
        async with server.serving(worker):
            await until(lambda: after in server.completed, timeout_s=10)  # the only slot came free
    assert broken not in server.completed
    assert ("/api/workers/complete", 500) in server.refused
    last_beat = next(beat for beat in reversed(server.heartbeats) if after in beat["task_ids"])
    assert broken not in last_beat["task_ids"]  # its lease is no longer renewed


async def test_gathering_a_handle_that_is_not_this_tasks_child_fails_the_task_for_good() -> None:
    """It made the task wait for a child that never counts: resumed at once, over and over."""
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("stranger")
        async def stranger(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> list[Any]:
            return await ctx.gather([taskgate.worker.Child("nobody")])

        task = server.add("stranger")
        async with server.serving(worker):
            await until(lambda: task in server.completed)
    assert server.completed[task]["outcome"] == "permanent_failure"
    assert "'nobody' is not a child this task spawned" in server.completed[task]["error"]


async def test_a_step_named_like_an_earlier_sleep_fails_its_task_and_never_returns_the_wait_record() -> None:
    """Names are unique per task. The claim says which stored names are wait records: a step under
    one of them must fail its task for good (as in-process), not return the sleep's record as its
    result without running its function."""
    server = FakeTaskgate()
    ran: list[str] = []
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("nap_then_step")
        async def nap_then_step(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            await ctx.sleep("nap", 0)
            return {"step": await ctx.step("nap", lambda: ran.append("step") or 42)}

        task_id = server.add("nap_then_step")
        record = {"sleep_until": "2026-01-01T00:00:00+00:00", "done": True}
        server.available[0].update(steps={"nap": record}, waits=["nap"])
        async with server.serving(worker):
            await until(lambda: task_id in server.completed)
    done = server.completed[task_id]
    assert ran == []
    assert done["outcome"] == "permanent_failure", done
    assert "has the name of a sleep or signal wait" in done["error"]


async def test_a_sleep_or_signal_wait_named_like_an_earlier_step_fails_its_task() -> None:
    """A step's result shaped like a wait record ({"done": true}, {"timed_out": true}) must not end
    a sleep at once or raise SignalTimeout: under a step's name, a wait fails its task."""
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("step_then_sleep")
        async def step_then_sleep(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> str:
            await ctx.step("x", lambda: {"done": True, "timed_out": True})
            if payload["signal"]:
                await ctx.wait_signal("x")
            else:
                await ctx.sleep("x", 60)
            return "went on"

        ids = [server.add("step_then_sleep", {"signal": signal}) for signal in (False, True)]
        for item in server.available:
            item.update(steps={"x": {"done": True, "timed_out": True}}, waits=[])
        async with server.serving(worker):
            await until(lambda: set(ids) <= server.completed.keys())
    for task_id in ids:
        done = server.completed[task_id]
        assert done["outcome"] == "permanent_failure", done
        assert "has the name of another step" in done["error"]


async def test_a_claim_without_waits_from_an_older_server_replays_as_before() -> None:
    server = FakeTaskgate()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)

        @worker.kind("slept")
        async def slept(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> int:
            await ctx.sleep("nap", 1)
            return int(await ctx.step("one", lambda: 2))

        task_id = server.add("slept")
        server.available[0]["steps"] = {"nap": {"sleep_until": "2026-01-01T00:00:00+00:00", "done": True},
                                        "one": 1}  # fmt: skip
        async with server.serving(worker):
            await until(lambda: task_id in server.completed)
    assert server.completed[task_id]["outcome"] == "completed"
    assert server.completed[task_id]["result"] == 1


async def test_progress_a_failed_heartbeat_did_not_deliver_goes_with_the_next_one() -> None:
    """Progress is taken out of the worker when a heartbeat is sent; a heartbeat the server
    answered with a 5xx (not a refusal of the progress) dropped it, so the last progress a handler
    reported before a quiet spell never reached the task."""
    server = FakeTaskgate(lease_s=6)  # a heartbeat every 2 s, the fence at 4.8 s
    server.break_heartbeats = 1
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1)
        release = asyncio.Event()

        @worker.kind("reports")
        async def reports(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            ctx.progress({"done": 1})
            await release.wait()

        task_id = server.add("reports")
        async with server.serving(worker):
            await until(lambda: server.refused == [("/api/workers/heartbeat", 500)])
            await until(lambda: bool(server.heartbeats), timeout_s=4)
            release.set()
            await until(lambda: task_id in server.completed)
    assert server.heartbeats[0]["progress"] == {task_id: {"done": 1}}


async def test_a_claim_a_stopping_server_ends_at_once_is_sent_again_after_its_retry_after() -> None:
    """A server shutting down ends every claim's long-poll at once, empty, with `Retry-After: 1`
    (claim again, another replica answers). The worker claimed again at once, in a tight loop of
    requests on the same connection, until the server closed it."""
    server = FakeTaskgate()
    server.stopping = True
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1)

        @worker.kind("noop")
        async def noop(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            return None

        async with server.serving(worker):
            await until(lambda: server.claims >= 1)
            await asyncio.sleep(0.6)
    assert server.claims == 1


async def test_tasks_claimed_when_the_worker_stops_before_they_start_are_handed_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim answered late in its long-poll is confirmed with a heartbeat before its tasks
    start; a stop during that heartbeat cancelled the claim loop and dropped the claimed tasks:
    never started, never handed back, each waited for its lease and lost an attempt (and a task
    on its last attempt was discarded without running)."""
    server = FakeTaskgate(lease_s=5)  # a 1 s margin: a claim answered later is confirmed first
    claim = server._claim
    confirming = asyncio.Event()

    async def late_claim(body: dict[str, Any]) -> httpx.Response:
        answer = await claim(body)
        if server.claims == 1:
            await asyncio.sleep(1.2)
        return answer

    async def hanging_heartbeat(body: dict[str, Any]) -> httpx.Response:
        confirming.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(server, "_claim", late_claim)
    monkeypatch.setattr(server, "_heartbeat", hanging_heartbeat)
    ran: list[str] = []
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=1, grace_s=1)

        @worker.kind("noop")
        async def noop(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> None:
            ran.append(str(ctx.task_id))

        task_id = server.add("noop", attempt=25)  # its last attempt
        async with server.serving(worker):
            await asyncio.wait_for(confirming.wait(), 10)
    assert ran == []
    handed_back = server.completed.get(task_id)
    assert handed_back is not None, "dropped: left to its lease"
    assert handed_back["outcome"] == "suspended"
    assert not handed_back.get("suspend")


async def test_a_completion_queued_while_an_earlier_run_of_its_task_is_being_completed_is_sent() -> None:
    """A suspension is written as soon as the server reaches it in a complete request, and its task
    is available at once: this worker may claim the next run and queue that run's completion before
    the request's answer comes back. Settling that answer by task id also dropped the next run's
    completion, never sent: its lease, no longer renewed, expired and the task ran again (a lost
    attempt, or discarded on its last one) though its run had completed."""

    class SlowAnswer(FakeTaskgate):
        def __init__(self) -> None:
            super().__init__()
            self.target = ""
            self.items: list[dict[str, Any]] = []
            self.worker: Any = None

        async def _complete(self, body: dict[str, Any]) -> Any:
            self.items += body["items"]
            if any(i["id"] == self.target and i["outcome"] == "suspended" for i in body["items"]):
                # the suspension is written first; the rest of the request takes a while
                self.add("job", task_id=self.target, attempt=2)
                await until(lambda: any(c["attempt"] == 2 for c in self.worker._pending))
            return await super()._complete(body)

    server = SlowAnswer()
    async with server.client() as client:
        worker = taskgate.Worker(client, concurrency=2, grace_s=1)
        server.worker = worker

        @worker.kind("job")
        async def job(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
            if ctx.attempt == 1:
                await ctx.sleep("nap", 0)
            return {"attempt": ctx.attempt}

        server.target = server.add("job")
        async with server.serving(worker):
            with contextlib.suppress(TimeoutError):
                await until(lambda: any(i["attempt"] == 2 for i in server.items), timeout_s=2)
    assert [(i["attempt"], i["outcome"]) for i in server.items] == [(1, "suspended"), (2, "completed")]
