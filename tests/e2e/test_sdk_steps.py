"""An SDK worker's durable steps against the real server over HTTPS: a step the server can never
store (a result over 1 MiB or not storable as JSON, a name that is not 1-200 characters without
NUL) fails its task for good on its first attempt, as in-process kinds do, instead of spending
every retry re-running the step."""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import Any

import httpx
import pytest

from app.database import Database
from tests.conftest import ROOT, make_client
from tests.e2e.conftest import ServerProcess
from tests.task_harness import eventually, fetch

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

pytestmark = pytest.mark.timeout(90)

BIG = "x" * (1024 * 1024)  # with its quotes, just over 1 MiB of JSON

# kind -> (the step's name, its result, what the task's last_error says); in-process kinds give the
# same messages (app/src/api/engine/durable.py, check_step_result)
UNSTORABLE: dict[str, tuple[str, Any, str]] = {
    "steps.big": ("big", BIG, "step 'big' returned more than 1 MiB of JSON"),
    "steps.huge": ("huge", BIG * 9, "step 'huge' returned more than 1 MiB of JSON"),  # over the body cap
    "steps.nul_result": ("nul", {"a": "\x00"}, "step 'nul' returned what cannot be stored: text must"),
    "steps.not_json": ("set", {1, 2}, "step 'set' returned what cannot be stored: not JSON"),
    "steps.empty_name": ("", 1, "a step name must be 1 to 200 characters, none of them NUL"),
    "steps.long_name": ("n" * 201, 1, "a step name must be 1 to 200 characters, none of them NUL"),
    "steps.nul_name": ("a\x00b", 1, "a step name must be 1 to 200 characters, none of them NUL"),
    "steps.sleep_long_name": ("n" * 201, 1, "a sleep's name must be 1 to 200 characters, none of them NUL"),
    "steps.sleep_too_long": ("nap", 367 * 86_400, "the sleep 'nap' is 31708800.0 s; it may be at most"),
    "steps.child_empty_key": ("", 1, "a child's key must be 1 to 200 characters, none of them NUL"),
    # what the server refuses of a suspension otherwise: replayed, the handler asks the same again
    "steps.child_priority": ("c", 10, "completion refused: 422"),
}


async def test_a_step_the_server_cannot_store_fails_its_task_for_good_at_once(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    issued = await make_client(db, "steps")
    ca = str(server.data_dir / "tls" / "cert.pem")
    ran: dict[str, int] = {}
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        worker = taskgate.Worker(tg, queues=["steps"], concurrency=10, wait_s=1, grace_s=5)
        for kind, (name, value, _) in UNSTORABLE.items():

            def handler(kind: str = kind, name: str = name, value: Any = value) -> Any:
                async def run(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Any:
                    def produce() -> Any:
                        ran[kind] = ran.get(kind, 0) + 1
                        return value

                    if kind.startswith("steps.sleep"):
                        await ctx.sleep(name, value)
                    elif kind.startswith("steps.child"):
                        priority = value if kind == "steps.child_priority" else None
                        await ctx.gather([await ctx.spawn("steps.big", {}, key=name, priority=priority)])
                    return {"step": await ctx.step(name, produce)}

                return run

            worker.kind(kind)(handler())

        @worker.kind("steps.sleep_negative")
        async def sleep_negative(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Any:
            await ctx.sleep("nap", -5)  # in-process takes it as 0; the server refused it (422)
            return {"slept": True}

        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        try:
            await tg.put_queue("steps", min_backoff_s=0.05, max_backoff_s=0.1)
            ids = {
                kind: (await tg.enqueue(kind, {}, queue="steps", max_attempts=3)).id for kind in UNSTORABLE
            }
            ids["steps.sleep_negative"] = (
                await tg.enqueue("steps.sleep_negative", {}, queue="steps", max_attempts=3)
            ).id

            async def finished() -> list[Any]:
                rows = await fetch(
                    clean_database,
                    "SELECT kind, status, attempts, last_error FROM tasks WHERE id = ANY($1::uuid[])",
                    list(ids.values()),
                )
                return rows if all(r["status"] in ("completed", "discarded") for r in rows) else []

            rows = await eventually(finished, timeout=60, interval=0.1)
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
    by_kind = {r["kind"]: r for r in rows}
    wrong = {
        kind: (by_kind[kind]["status"], by_kind[kind]["attempts"], by_kind[kind]["last_error"], ran.get(kind))
        for kind, (_, _, error) in UNSTORABLE.items()
        if (by_kind[kind]["status"], by_kind[kind]["attempts"]) != ("discarded", 1)
        or error not in (by_kind[kind]["last_error"] or "")
        or ran.get(kind, 0) > 1
    }
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    negative = by_kind["steps.sleep_negative"]
    assert negative["status"] == "completed", negative["last_error"]


async def test_sdk_steps_reads_every_page_of_a_large_state(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """GET /api/tasks/{id}/steps answers at most 4 MiB of results a page; `tg.steps(id)` returns
    every step still, one bounded answer at a time (it read one answer holding the whole state)."""
    issued = await make_client(db, "pages")
    ca = str(server.data_dir / "tls" / "cert.pem")
    sizes: list[int] = []

    async def measured(response: httpx.Response) -> None:
        if response.url.path.endswith("/steps"):
            sizes.append(len(await response.aread()))

    http = httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {issued.api_key}"},
        verify=ssl.create_default_context(cafile=ca),
        timeout=30,
        event_hooks={"response": [measured]},
    )
    async with http, taskgate.AsyncClient(server.base_url, http=http) as tg:
        task = await tg.enqueue("noop", {}, delay_s=3600)
        await fetch(
            clean_database,
            "INSERT INTO task_steps (task_id, name, result, created_at) "
            "SELECT $1, 's' || i, to_jsonb(repeat('x', 1000000)), now() + make_interval(secs => i) "
            "FROM generate_series(0, 9) AS i",
            task.id,
        )
        steps = await tg.steps(task.id)
    assert [s["name"] for s in steps] == [f"s{i}" for i in range(10)]
    assert all(s["result"] == "x" * 1_000_000 for s in steps)
    assert len(sizes) == 3, sizes
    assert max(sizes) < 5 * 1024 * 1024, sizes


async def test_children_past_one_completion_body_are_spawned_over_several_suspensions(
    server: ServerProcess, db: Database, clean_database: str
) -> None:
    """A parent whose spawned children come to more than one completion request's 8 MiB body (nine
    payloads of 1 MiB) reaches its gather, as in-process, its step run once: the SDK sends the
    children that fit with the step, and the replay spawns the rest. The whole suspension was
    reported `failed`, retried (the step run again each time) and discarded on its last attempt."""
    issued = await make_client(db, "fanbig")
    ca = str(server.data_dir / "tls" / "cert.pem")
    ran: list[int] = []
    async with taskgate.AsyncClient(server.base_url, api_key=issued.api_key, verify=ca) as tg:
        worker = taskgate.Worker(tg, queues=["fan"], concurrency=2, wait_s=1, grace_s=5)

        @worker.kind("fan.child")
        async def child(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Any:
            return {"n": len(payload["pad"])}

        @worker.kind("fan.big")
        async def parent(ctx: taskgate.TaskContext, payload: dict[str, Any]) -> Any:
            handles = [
                await ctx.spawn("fan.child", {"pad": f"{i}" * (1024 * 1024)}, key=f"c{i}", queue="held")
                for i in range(9)
            ]
            marked = await ctx.step("mark", lambda: ran.append(1) or len(ran))
            return {"mark": marked, "children": len(await ctx.gather(handles))}

        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        try:
            await tg.put_queue("fan", min_backoff_s=0.05, max_backoff_s=0.1)
            await tg.put_queue("held", paused=True)  # the children wait: the parent waits for them
            task = await tg.enqueue("fan.big", {}, queue="fan", max_attempts=3)

            async def parked() -> Any:
                got = await tg.get(task.id)
                return got if got.status in ("waiting", "discarded", "completed") else None

            got = await eventually(parked, timeout=60, interval=0.1)
            assert got.status == "waiting", got.last_error
            assert got.waiting_for == {"type": "children"}
            children = await fetch(
                clean_database, "SELECT child_key FROM tasks WHERE parent_id = $1", task.id
            )
            assert sorted(r["child_key"] for r in children) == [f"c{i}" for i in range(9)]
            outcomes = [a.outcome for a in await tg.attempts(task.id)]
            assert set(outcomes) == {"suspended"}, outcomes
            assert ran == [1]
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
