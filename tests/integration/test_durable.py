"""Durable composition with the worker in this process: steps, sleep, signals, children, depends_on."""

import asyncio
import base64
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from quart import Quart

from tests.conftest import driver_uri
from tests.task_harness import enqueue, eventually, fetch, lines

Serving = Callable[..., Awaitable[Quart]]
ALL_ROLES = {"ROLES": ["api", "worker", "scheduler"]}


async def get(client: Any, headers: dict[str, str], path: str) -> Any:
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, await response.get_data(as_text=True)
    return await response.get_json()


async def wait_done(
    client: Any, headers: dict[str, str], task_id: str, timeout: float = 20
) -> dict[str, Any]:
    """The task once it is finished, waited for as a client waits: GET /api/tasks/{id}?wait=N."""
    task: dict[str, Any] = await get(client, headers, f"/api/tasks/{task_id}?wait={timeout}")
    assert task["status"] in ("completed", "discarded", "cancelled"), task
    return task


async def test_steps_run_once_and_are_listed(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    marks = tmp_path / "steps.txt"
    task = await enqueue(client, auth_headers, kind="test.steps", payload={"path": str(marks)})
    done = await wait_done(client, auth_headers, task["id"])
    assert done["status"] == "completed"
    assert done["result"] == {"results": [1, 2, 3]}
    assert Counter(line.split()[1] for line in lines(marks)) == {"one": 1, "two": 1, "three": 1}
    steps = (await get(client, auth_headers, f"/api/tasks/{task['id']}/steps"))["items"]
    assert [(s["name"], s["result"]) for s in steps] == [("one", 1), ("two", 2), ("three", 3)]


async def test_a_failed_step_is_retried_with_the_task_and_earlier_steps_do_not_rerun(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put(
        "/api/queues/steps", json={"min_backoff_s": 0.1, "max_backoff_s": 0.2}, headers=auth_headers
    )
    marks, gate = tmp_path / "steps.txt", tmp_path / "gate"
    task = await enqueue(
        client, auth_headers, kind="test.steps", queue="steps", max_attempts=10,
        payload={"path": str(marks), "gate": str(gate)},
    )  # fmt: skip
    await eventually(lambda: _attempts(client, auth_headers, task["id"], at_least=2))
    gate.touch()
    done = await wait_done(client, auth_headers, task["id"])
    assert done["status"] == "completed"
    runs = Counter(line.split()[1] for line in lines(marks))
    assert runs["one"] == runs["two"] == 1
    assert runs["three"] >= 3


async def _attempts(client: Any, headers: dict[str, str], task_id: str, *, at_least: int) -> bool:
    items = (await get(client, headers, f"/api/tasks/{task_id}/attempts"))["items"]
    return len([a for a in items if a["outcome"] == "failed"]) >= at_least


async def test_a_signal_sent_before_the_wait_and_one_sent_after_are_both_delivered(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    # early: the signal is kept before the task ever ran (its queue is paused)
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)
    early = await enqueue(
        client, auth_headers, kind="test.await_signal", queue="held", payload={"name": "go"}
    )
    sent = await client.post(
        f"/api/tasks/{early['id']}/signals/go", json={"data": {"n": 1}}, headers=auth_headers
    )
    assert sent.status_code == 202
    assert (await sent.get_json())["status"] == "available"
    await client.post("/api/queues/held/resume", headers=auth_headers)
    # late: the task waits first
    late = await enqueue(client, auth_headers, kind="test.await_signal", payload={"name": "shipped"})

    async def waiting() -> Any:
        task = await get(client, auth_headers, f"/api/tasks/{late['id']}")
        return task if task["status"] == "waiting" else None

    parked = await eventually(waiting)
    assert parked["waiting_for"] == {"type": "signal", "name": "shipped"}
    assert [b["reason"] for b in parked["blocked_by"]] == ["signal"]
    assert "shipped" in parked["blocked_by"][0]["detail"]
    sent = await client.post(
        f"/api/tasks/{late['id']}/signals/shipped", json={"data": {"carrier": "ups"}}, headers=auth_headers
    )
    assert sent.status_code == 202
    assert (await wait_done(client, auth_headers, early["id"]))["result"] == {"data": {"n": 1}}
    assert (await wait_done(client, auth_headers, late["id"]))["result"] == {"data": {"carrier": "ups"}}
    # a second signal of the same name, or one for a finished task, changes nothing
    again = await client.post(
        f"/api/tasks/{late['id']}/signals/shipped", json={"data": 2}, headers=auth_headers
    )
    assert again.status_code == 409
    assert again.headers["Content-Type"] == "application/problem+json"


async def test_signals_are_tenant_isolated_and_validated(
    serving: Serving, auth_headers: dict[str, str], other_client_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.await_signal", payload={"name": "go"})
    foreign = await client.post(
        f"/api/tasks/{task['id']}/signals/go", json={"data": 1}, headers=other_client_headers
    )
    assert foreign.status_code == 404
    steps = await client.get(f"/api/tasks/{task['id']}/steps", headers=other_client_headers)
    assert steps.status_code == 404
    bad = await client.post(f"/api/tasks/{task['id']}/signals/-bad", json={"data": 1}, headers=auth_headers)
    assert bad.status_code == 422
    assert bad.headers["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in (await bad.get_json())["errors"]] == ["path.name"]
    extra = await client.post(f"/api/tasks/{task['id']}/signals/go", json={"nope": 1}, headers=auth_headers)
    assert extra.status_code in (400, 422)
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM task_signals"))[0]["n"] == 0


async def test_a_durable_sleep_and_a_signal_wait_hold_no_worker_slot_and_the_wait_times_out(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**ALL_ROLES, WORKER_CONCURRENCY=1)
    client = app.test_client()
    sleeper = await enqueue(client, auth_headers, kind="test.nap", payload={"seconds": 2})
    waiter = await enqueue(
        client, auth_headers, kind="test.await_signal", payload={"name": "x", "timeout_s": 0.5}
    )

    async def parked() -> bool:
        statuses = [
            (await get(client, auth_headers, f"/api/tasks/{t['id']}"))["status"] for t in (sleeper, waiter)
        ]
        return statuses == ["scheduled", "waiting"]

    await eventually(parked)
    # the only slot is free while they sleep and wait: other tasks run and finish meanwhile
    others = [await enqueue(client, auth_headers, kind="noop", payload={}) for _ in range(3)]
    for other in others:
        assert (await wait_done(client, auth_headers, other["id"], timeout=1.5))["status"] == "completed"
    assert (await get(client, auth_headers, f"/api/tasks/{sleeper['id']}"))["status"] == "scheduled"
    timed_out = await wait_done(client, auth_headers, waiter["id"])
    assert timed_out["result"] == {"timed_out": True}
    # too late: the task is finished, the signal is refused
    late = await client.post(f"/api/tasks/{waiter['id']}/signals/x", json={"data": 1}, headers=auth_headers)
    assert late.status_code == 409
    done = await wait_done(client, auth_headers, sleeper["id"])
    assert done["status"] == "completed"
    assert done["result"]["slept_s"] >= 2


async def test_fan_out_and_gather_and_a_failing_child_raises_child_failed(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    marks = tmp_path / "children.txt"
    parent = await enqueue(
        client, auth_headers, kind="test.fanout", payload={"children": 20, "path": str(marks)}
    )
    done = await wait_done(client, auth_headers, parent["id"])
    assert done["result"] == {"sum": sum(i * 2 for i in range(20)), "count": 20}
    assert len(lines(marks)) == 20
    children = await get(client, auth_headers, "/api/tasks?kind=test.child&limit=100")
    assert {c["parent_id"] for c in children["items"]} == {parent["id"]}
    told = await events_of(client, auth_headers, parent["id"])
    assert sorted(e["key"] for name, e in told if name == "child") == sorted(f"c{i}" for i in range(20))
    assert {e["status"] for name, e in told if name == "child"} == {"completed"}
    assert [name for name, _ in told].count("suspended") == 1
    failing = await enqueue(client, auth_headers, kind="test.fanout", payload={"children": 3, "fail": [1]})
    failed = await wait_done(client, auth_headers, failing["id"])
    assert failed["result"] == {"child_failed": "c1", "status": "discarded"}


async def test_depends_on_runs_a_diamond_in_order_and_cancels_after_a_discard(
    serving: Serving, auth_headers: dict[str, str], other_client_headers: dict[str, str], tmp_path: Path
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/gated", json={"paused": True}, headers=auth_headers)
    a = await enqueue(client, auth_headers, kind="noop", queue="gated", payload={})
    b = await enqueue(client, auth_headers, kind="noop", payload={}, depends_on=[a["id"]])
    c = await enqueue(client, auth_headers, kind="noop", payload={}, depends_on=[a["id"]])
    d = await enqueue(client, auth_headers, kind="noop", payload={}, depends_on=[b["id"], c["id"]])
    assert b["status"] == "waiting"
    assert b["waiting_for"] == {"type": "dependencies", "task_ids": [a["id"]]}
    assert d["depends_on"] == [b["id"], c["id"]]
    await asyncio.sleep(0.5)
    held = await get(client, auth_headers, f"/api/tasks/{d['id']}")
    assert held["status"] == "waiting"
    assert [b["reason"] for b in held["blocked_by"]] == ["dependencies"]  # why it is not running
    await client.post("/api/queues/gated/resume", headers=auth_headers)
    finished = {t["id"]: await wait_done(client, auth_headers, t["id"]) for t in (a, b, c, d)}
    assert all(t["status"] == "completed" for t in finished.values())
    assert finished[a["id"]]["finished_at"] <= finished[b["id"]]["started_at"]
    assert (
        max(finished[b["id"]]["finished_at"], finished[c["id"]]["finished_at"])
        <= finished[d["id"]]["started_at"]
    )

    # C discarded: D, which needs it, is cancelled and says why
    a2 = await enqueue(client, auth_headers, kind="noop", payload={})
    c2 = await enqueue(
        client,
        auth_headers,
        kind="test.flaky",
        payload={"fail_times": 1, "permanent": True},
        depends_on=[a2["id"]],
    )
    d2 = await enqueue(client, auth_headers, kind="noop", payload={}, depends_on=[a2["id"], c2["id"]])
    cancelled = await wait_done(client, auth_headers, d2["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["last_error"] == f"dependency {c2['id']} was discarded"

    # unknown and foreign ids are a 422 and create nothing
    foreign = await enqueue(client, other_client_headers, kind="noop", payload={})
    before = (await get(client, auth_headers, "/api/tasks?limit=500"))["items"]
    for deps in ([foreign["id"]], ["018f0000-0000-7000-8000-000000000000"]):
        response = await client.post(
            "/api/tasks", json={"kind": "noop", "payload": {}, "depends_on": deps}, headers=auth_headers
        )
        assert response.status_code == 422
        problem = await response.get_json()
        assert problem["errors"][0]["field"] == "depends_on.0"
    assert len((await get(client, auth_headers, "/api/tasks?limit=500"))["items"]) == len(before)


async def test_cancelling_a_parent_cancels_its_unfinished_children(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/kids", json={"paused": True}, headers=auth_headers)
    parent = await enqueue(client, auth_headers, kind="test.fanout", payload={"children": 5, "queue": "kids"})

    async def waiting() -> Any:
        task = await get(client, auth_headers, f"/api/tasks/{parent['id']}")
        return task if task["status"] == "waiting" else None

    parked = await eventually(waiting)
    assert parked["waiting_for"] == {"type": "children"}
    assert [b["reason"] for b in parked["blocked_by"]] == ["children"]
    # one child is locked by someone else (as a completion would) while the parent is cancelled:
    # the cancel does not wait for it, and the scheduler's sweep cancels it right after
    locker = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with locker.transaction():
            await locker.execute(
                "SELECT id FROM tasks WHERE parent_id = $1 AND child_key = 'c0' FOR UPDATE",
                UUID(parent["id"]),
            )
            response = await client.post(f"/api/tasks/{parent['id']}/cancel", headers=auth_headers)
            assert response.status_code == 200
            children = (await get(client, auth_headers, "/api/tasks?kind=test.child"))["items"]
            assert sorted(c["status"] for c in children) == ["available"] + ["cancelled"] * 4
    finally:
        await locker.close()

    async def all_cancelled() -> bool:
        children = (await get(client, auth_headers, "/api/tasks?kind=test.child"))["items"]
        return {c["status"] for c in children} == {"cancelled"}

    await eventually(all_cancelled, timeout=5)


async def test_the_events_stream_tells_steps_suspensions_signals_and_children(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.await_signal", payload={"name": "go"})

    async def waiting() -> bool:
        return (await get(client, auth_headers, f"/api/tasks/{task['id']}"))["status"] == "waiting"

    await eventually(waiting)
    await client.post(f"/api/tasks/{task['id']}/signals/go", json={"data": 1}, headers=auth_headers)
    await wait_done(client, auth_headers, task["id"])
    events = await events_of(client, auth_headers, task["id"])
    names = [name for name, _ in events]
    assert {"step", "suspended", "signal", "task"} <= set(names)
    assert ("step", "go") in [(n, e.get("name")) for n, e in events]


async def events_of(client: Any, headers: dict[str, str], task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The events stream of a finished task, read to its end: [(event name, data)]."""
    response = await client.get(f"/api/tasks/{task_id}/events", headers=headers)
    blocks = (await response.get_data(as_text=True)).split("\n\n")
    return [
        (
            block.split("\n")[0].removeprefix("event: "),
            json.loads(block.split("\n")[1].removeprefix("data: ")),
        )
        for block in blocks
        if block.startswith("event:")
    ]


async def test_the_console_task_page_shows_steps_children_and_what_it_waits_for(
    serving: Serving, auth_headers: dict[str, str], operator: Any, tmp_path: Path
) -> None:
    from tests.integration.ui.test_console import Browser, log_in

    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/kids", json={"paused": True}, headers=auth_headers)
    parent = await enqueue(client, auth_headers, kind="test.fanout", payload={"children": 2, "queue": "kids"})

    async def waiting() -> bool:
        return (await get(client, auth_headers, f"/api/tasks/{parent['id']}"))["status"] == "waiting"

    await eventually(waiting)
    steps = await enqueue(client, auth_headers, kind="test.steps", payload={"path": str(tmp_path / "s.txt")})
    await wait_done(client, auth_headers, steps["id"])
    browser = Browser(app)
    await log_in(browser, operator)
    page = await (await browser.get(f"/ui/tasks/{parent['id']}")).get_data(as_text=True)
    assert "Waiting for" in page
    assert "children" in page
    assert "Children" in page
    assert ">c0<" in page
    assert ">c1<" in page
    steps_page = await (await browser.get(f"/ui/tasks/{steps['id']}")).get_data(as_text=True)
    assert "Steps" in steps_page
    assert ">three<" in steps_page


async def test_composition_limits_fail_the_task_for_good_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    big = await enqueue(client, auth_headers, kind="test.limits", payload={"big_step": True})
    many = await enqueue(client, auth_headers, kind="test.limits", payload={"children": 10_001})
    long = await enqueue(client, auth_headers, kind="test.limits", payload={"steps": 1_001})
    big_done = await wait_done(client, auth_headers, big["id"])
    assert (big_done["status"], big_done["attempts"]) == ("discarded", 1)
    assert big_done["last_error"] == "step 'big' returned more than 1 MiB of JSON"
    many_done = await wait_done(client, auth_headers, many["id"])
    assert many_done["status"] == "discarded"
    assert many_done["last_error"] == "a task may have at most 10000 children"
    long_done = await wait_done(client, auth_headers, long["id"])
    assert long_done["status"] == "discarded"
    assert long_done["last_error"] == "a task may hold at most 1000 steps"
    stored = await fetch(
        clean_database, "SELECT count(*) AS n FROM task_steps WHERE task_id = $1", long["id"]
    )
    assert stored[0]["n"] == 1000  # the thousand it was allowed, none past them
    assert (await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE parent_id IS NOT NULL"))[0][
        "n"
    ] == 0


async def test_depends_on_with_an_idempotency_key_and_in_a_batch(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    app = await serving(ROLES=["api"])
    client = app.test_client()
    a = await enqueue(client, auth_headers, kind="noop", payload={})
    body = {"kind": "noop", "payload": {}, "depends_on": [a["id"]]}
    headers = {**auth_headers, "Idempotency-Key": "dep-1"}
    first = await client.post("/api/tasks", json=body, headers=headers)
    again = await client.post("/api/tasks", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert (await first.get_json())["id"] == (await again.get_json())["id"]
    assert (await again.get_json())["status"] == "waiting"
    bad = await client.post(
        "/api/tasks/batch",
        json={"tasks": [body, {**body, "depends_on": [a["id"], "018f0000-0000-7000-8000-000000000000"]}]},
        headers=auth_headers,
    )
    assert bad.status_code == 422
    assert [e["field"] for e in (await bad.get_json())["errors"]] == ["tasks.1.depends_on.1"]
    too_many = await client.post(
        "/api/tasks", json={**body, "depends_on": [a["id"]] * 101}, headers=auth_headers
    )
    assert too_many.status_code == 422


async def test_an_operator_sends_a_signal_from_the_console(
    serving: Serving, auth_headers: dict[str, str], operator: Any
) -> None:
    from tests.integration.ui.test_console import Browser, log_in

    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.await_signal", payload={"name": "approved"})

    async def waiting() -> bool:
        return (await get(client, auth_headers, f"/api/tasks/{task['id']}"))["status"] == "waiting"

    await eventually(waiting)
    browser = Browser(app)
    await log_in(browser, operator)
    path = f"/ui/tasks/{task['id']}"
    page = await (await browser.get(path)).get_data(as_text=True)
    assert 'name="name" required maxlength="128" value="approved"' in page  # the awaited name
    token = await browser.csrf(path)
    # refused without the CSRF token, and for data that is not JSON: nothing is delivered
    refused = await browser.post(f"{path}/signal", {"name": "approved", "data": "{}"})
    assert refused.status_code == 403
    bad = await browser.post(f"{path}/signal", {"name": "approved", "data": "{not json", "csrf_token": token})
    assert bad.status_code == 422
    unnamed = await browser.post(f"{path}/signal", {"name": "-x", "data": "{}", "csrf_token": token})
    assert unnamed.status_code == 422
    assert "A signal name is 1 to 128 letters" in await unnamed.get_data(as_text=True)
    assert (await get(client, auth_headers, f"/api/tasks/{task['id']}"))["status"] == "waiting"
    sent = await browser.post(
        f"{path}/signal", {"name": "approved", "data": '{"by": "ops"}', "csrf_token": token}
    )
    assert sent.status_code == 303
    done = await wait_done(client, auth_headers, task["id"])
    assert done["result"] == {"data": {"by": "ops"}}


async def test_a_cancel_asked_while_a_durable_task_runs_holds_when_it_suspends(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Cancelled inside a step, the task reaches a durable sleep: it ends cancelled there instead
    of sleeping and running on to completion."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="test.hold_then_nap", payload={"hold_s": 1.0, "seconds": 0.2}
    )
    await eventually(lambda: _status(clean_database, task["id"], "running"))
    asked = await client.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)
    assert (await asked.get_json())["status"] == "running"  # asked; the handler is inside its step
    done = await wait_done(client, auth_headers, task["id"])
    assert done["status"] == "cancelled"
    await asyncio.sleep(0.5)  # past the sleep it would have taken
    outcomes = [
        r["outcome"]
        for r in await fetch(
            clean_database,
            "SELECT outcome FROM task_attempts WHERE task_id = $1 ORDER BY id",
            UUID(task["id"]),
        )
    ]
    assert outcomes == ["suspended"]  # no second run
    [row] = await fetch(clean_database, "SELECT status FROM tasks WHERE id = $1", UUID(task["id"]))
    assert row["status"] == "cancelled"
    # retried by hand, it has the attempts ahead of it that it was created with, suspensions aside
    retried = await (await client.post(f"/api/tasks/{task['id']}/retry", headers=auth_headers)).get_json()
    assert retried["max_attempts"] - retried["attempts"] == task["max_attempts"]


async def _status(database_uri: str, task_id: str, status: str) -> bool:
    rows = await fetch(database_uri, "SELECT status FROM tasks WHERE id = $1", UUID(task_id))
    return bool(rows) and rows[0]["status"] == status


async def test_a_step_result_shaped_like_a_wait_record_is_replayed_as_it_was_stored(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """Wait records were told apart by their keys: this step was read as a sleep, its value cast
    to a time, and every claim that loaded it failed."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.wait_shaped_step", payload={"seconds": 0.1})
    done = await wait_done(client, auth_headers, task["id"])
    assert done["status"] == "completed", done
    assert done["result"] == {"step": {"sleep_until": "when ready", "timed_out": "no"}}
    assert done["attempts"] == 2  # the run that slept and the one that woke: no lost lease


async def test_a_dependent_retried_by_hand_waits_for_its_dependencies_again(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Cancelled because its dependency was, a dependent retried by hand must not run before that
    dependency has completed: refused while it is cancelled, waiting while it runs again."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    dependency = await enqueue(client, auth_headers, kind="sleep", payload={"seconds": 1}, delay_s=600)
    dependent = await enqueue(client, auth_headers, kind="noop", payload={}, depends_on=[dependency["id"]])
    assert dependent["status"] == "waiting"
    await client.post(f"/api/tasks/{dependency['id']}/cancel", headers=auth_headers)
    assert (await wait_done(client, auth_headers, dependent["id"]))["status"] == "cancelled"

    refused = await client.post(f"/api/tasks/{dependent['id']}/retry", headers=auth_headers)
    assert refused.status_code == 409
    assert "dependency" in (await refused.get_json())["detail"]

    retried_dependency = await client.post(f"/api/tasks/{dependency['id']}/retry", headers=auth_headers)
    assert retried_dependency.status_code == 200
    again = await (await client.post(f"/api/tasks/{dependent['id']}/retry", headers=auth_headers)).get_json()
    assert again["status"] == "waiting"
    assert again["waiting_for"] == {"type": "dependencies", "task_ids": [dependency["id"]]}
    finished = await wait_done(client, auth_headers, dependent["id"])
    assert finished["status"] == "completed"
    [first] = await fetch(
        clean_database, "SELECT finished_at FROM tasks WHERE id = $1", UUID(dependency["id"])
    )
    [then] = await fetch(clean_database, "SELECT started_at FROM tasks WHERE id = $1", UUID(dependent["id"]))
    assert then["started_at"] >= first["finished_at"]  # it ran after its dependency completed


async def test_children_spawned_in_process_are_held_to_their_clients_own_quota(
    serving: Serving, clean_database: str
) -> None:
    """The in-process side of the quota rule for children (test_remote_workers has the remote one):
    a client allowed 2 unfinished tasks got its parent and 3 children stored; now the attempt
    fails, to be retried once the quota has room, and no child exists."""
    from app.src.api.auth import clients
    from app.src.api.models.auth import SCOPES
    from tests.conftest import bearer

    app = await serving(**ALL_ROLES)
    client = app.test_client()
    _, key = await clients.create_client(
        app.extensions["taskgate"].db, name="small", scopes=SCOPES, max_queued_tasks=2
    )
    headers = bearer(key.api_key)
    parent = await enqueue(client, headers, kind="test.fanout", payload={"children": 3})

    async def retried() -> dict[str, Any] | None:
        task: dict[str, Any] = await get(client, headers, f"/api/tasks/{parent['id']}")
        return task if task["status"] == "retryable" else None

    task = await eventually(retried)
    assert "a child cannot be created now" in task["last_error"]
    assert "quota is 2" in task["last_error"]
    rows = await fetch(clean_database, "SELECT count(*) AS n FROM tasks WHERE parent_id IS NOT NULL")
    assert rows[0]["n"] == 0


async def test_a_durable_task_whose_state_cannot_be_loaded_in_an_outage_is_handed_back(
    serving: Serving, auth_headers: dict[str, str], monkeypatch: Any
) -> None:
    """Loading the stored steps of claimed durable tasks failed (the database out of reach for a
    moment): the whole claim round failed, and every task it had claimed (durable or not) waited
    out its lease and lost an attempt, or was discarded on its last one. Now the durable ones are
    handed back at once, the attempt not spent, and run as soon as their state can be read."""
    from app.src.database import durable as durable_store

    load_state = durable_store.load_state
    failures: list[int] = []

    async def failing_once(conn: Any, task_ids: Any) -> Any:
        if not failures:
            failures.append(len(task_ids))
            raise ConnectionResetError("injected: the connection was reset")
        return await load_state(conn, task_ids)

    monkeypatch.setattr(durable_store, "load_state", failing_once)
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.nap", payload={"seconds": 0.3})
    done = await wait_done(client, auth_headers, task["id"])
    assert failures == [1]  # the claim after the nap met the outage
    assert done["status"] == "completed"
    outcomes = [
        a["outcome"] for a in (await get(client, auth_headers, f"/api/tasks/{task['id']}/attempts"))["items"]
    ]
    assert "lost" not in outcomes, outcomes
    assert outcomes[-1] == "completed"


async def test_a_sleep_or_signal_wait_past_what_a_timestamp_holds_fails_its_task_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """`ctx.sleep(name, 1e13)` (317,000 years) made the suspension's statement fail on the
    database's time range: the attempt was left to its lease, rescued as lost, and run again until
    its attempts were spent, each time ending the same way, with 'lease expired' as its error."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    sleeper = await enqueue(client, auth_headers, kind="test.nap", payload={"seconds": 1e13}, max_attempts=3)
    waiter = await enqueue(
        client, auth_headers, kind="test.await_signal", payload={"name": "x", "timeout_s": 1e13},
        max_attempts=3,
    )  # fmt: skip
    for task in (sleeper, waiter):
        done = await wait_done(client, auth_headers, task["id"], timeout=5)
        assert (done["status"], done["attempts"]) == ("discarded", 1), done
        assert "may be at most 31622400 s" in done["last_error"], done["last_error"]


async def test_a_step_named_like_a_sleep_before_it_fails_its_task_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """Names are unique per task. A step under the name of a sleep taken before found the sleep's
    record in the replayed state and returned it, in silence, as its result: its function never
    ran."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.step_named_like_a_sleep", payload={"seconds": 0})
    done = await wait_done(client, auth_headers, task["id"], timeout=10)
    assert done["status"] == "discarded", done["result"]  # not the sleep record as its result
    assert "has the name of a sleep or signal wait" in done["last_error"], done["last_error"]


async def test_a_sleep_or_signal_wait_named_like_a_step_before_it_fails_its_task_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """The other way round: a wait under the name of a step taken before it took the step's result
    for its record. One holding `done` ended the hour's sleep at once, in silence; one holding
    `timed_out` raised SignalTimeout without any wait (an SDK worker fails the task, as the server
    does for any other step result)."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    for wait in ("sleep", "signal"):
        task = await enqueue(client, auth_headers, kind="test.wait_named_like_a_step", payload={"wait": wait})
        done = await wait_done(client, auth_headers, task["id"], timeout=10)
        assert done["status"] == "discarded", (wait, done["result"])
        assert "'review' has the name of another step, sleep or signal wait" in done["last_error"], done


async def _children(client: Any, headers: dict[str, str], parent_id: str) -> list[dict[str, Any]]:
    items = (await get(client, headers, "/api/tasks?kind=test.child&limit=100"))["items"]
    return [c for c in items if c["parent_id"] == parent_id]


async def test_a_parent_cancelled_while_it_runs_stops_its_children_however_its_attempt_ends(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A cancel asked while the parent ran stopped its children only if its attempt then ended
    unfinished: one that failed for good (discarded) or returned (completed) left them queued for
    a parent that would never gather them."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/kids", json={"paused": True}, headers=auth_headers)
    for end, status, told in (("fail", "discarded", "discarded"), ("complete", "completed", "cancelled")):
        parent = await enqueue(
            client,
            auth_headers,
            kind="test.spawn_then_end",
            payload={"queue": "kids", "hold_s": 1.5, "end": end},
        )

        async def holding(parent_id: str = parent["id"]) -> bool:
            rows = await fetch(
                clean_database,
                "SELECT 1 FROM task_steps WHERE task_id = $1 AND name = 'spawned'",
                UUID(parent_id),
            )
            return bool(rows) and await _status(clean_database, parent_id, "running")

        await eventually(holding)  # the children exist, the parent holds in its step
        asked = await client.post(f"/api/tasks/{parent['id']}/cancel", headers=auth_headers)
        assert (await asked.get_json())["status"] == "running"
        assert (await wait_done(client, auth_headers, parent["id"]))["status"] == status
        children = await _children(client, auth_headers, parent["id"])
        assert [c["status"] for c in children] == ["cancelled", "cancelled"], (end, children)
        assert {c["last_error"] for c in children} == {f"parent {parent['id']} was {told}"}


async def test_a_parent_that_fails_for_good_stops_its_children_and_one_that_completes_leaves_them(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Discarded, a parent will never gather its children: they are cancelled, also those its end
    had to skip (locked at that moment), by the sweep. Children a parent completes without
    gathering are fire and forget: they stay."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/kids", json={"paused": True}, headers=auth_headers)
    kept = await enqueue(
        client, auth_headers, kind="test.spawn_then_end", payload={"queue": "kids", "end": "complete"}
    )
    assert (await wait_done(client, auth_headers, kept["id"]))["status"] == "completed"
    assert [c["status"] for c in await _children(client, auth_headers, kept["id"])] == ["available"] * 2

    parent = await enqueue(
        client, auth_headers, kind="test.spawn_then_end", payload={"queue": "kids", "hold_s": 1.0}
    )
    await eventually(lambda: _status(clean_database, parent["id"], "running"))
    await eventually(
        lambda: fetch(
            clean_database,
            "SELECT 1 FROM task_steps WHERE task_id = $1 AND name = 'spawned'",
            UUID(parent["id"]),
        )
    )
    locker = await asyncpg.connect(driver_uri(clean_database))
    try:
        async with locker.transaction():
            await locker.execute(
                "SELECT id FROM tasks WHERE parent_id = $1 AND child_key = 'c0' FOR UPDATE",
                UUID(parent["id"]),
            )
            assert (await wait_done(client, auth_headers, parent["id"]))["status"] == "discarded"
            statuses = sorted(c["status"] for c in await _children(client, auth_headers, parent["id"]))
            assert statuses == ["available", "cancelled"]
    finally:
        await locker.close()

    async def all_cancelled() -> list[dict[str, Any]] | None:
        children = await _children(client, auth_headers, parent["id"])
        return children if {c["status"] for c in children} == {"cancelled"} else None

    children = await eventually(all_cancelled, timeout=5)
    assert {c["last_error"] for c in children} == {f"parent {parent['id']} was discarded"}


async def test_a_signal_sent_after_its_wait_timed_out_is_refused(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Once the sweep timed a wait out, the handler sees SignalTimeout on every run: a signal sent
    then was answered 202 and stored, but never delivered (the run that took the timeout had gone
    on), or delivered to a later run only (a replay that took another path than the first)."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    signal = {"data": {"late": True}}
    # the run after the timeout has taken it and naps: the task is unfinished, the wait is over
    napping = await enqueue(
        client,
        auth_headers,
        kind="test.await_signal",
        payload={"name": "late", "timeout_s": 0.2, "nap_s": 30},
    )
    await eventually(lambda: _status(clean_database, napping["id"], "scheduled"), timeout=10)
    late = await client.post(f"/api/tasks/{napping['id']}/signals/late", json=signal, headers=auth_headers)
    assert late.status_code == 409
    assert "timed out" in (await late.get_json())["detail"]

    # timed out by the sweep, not run again yet (its queue is paused): the same answer, and the
    # run that follows sees the timeout
    await client.put("/api/queues/sig", json={"paused": False}, headers=auth_headers)
    waiting = await enqueue(
        client, auth_headers, kind="test.await_signal", payload={"name": "late", "timeout_s": 2}, queue="sig"
    )
    await eventually(lambda: _status(clean_database, waiting["id"], "waiting"))
    await client.put("/api/queues/sig", json={"paused": True}, headers=auth_headers)
    await eventually(lambda: _status(clean_database, waiting["id"], "available"), timeout=10)
    late = await client.post(f"/api/tasks/{waiting['id']}/signals/late", json=signal, headers=auth_headers)
    assert late.status_code == 409
    await client.put("/api/queues/sig", json={"paused": False}, headers=auth_headers)
    assert (await wait_done(client, auth_headers, waiting["id"]))["result"] == {"timed_out": True}


async def test_gathering_a_handle_that_is_not_this_tasks_child_fails_the_task_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """It made the task wait for a child that never counts: resumed at once, over and over."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    unknown = await enqueue(client, auth_headers, kind="test.gather_stranger", payload={"stranger": ""})
    done = await wait_done(client, auth_headers, unknown["id"], timeout=10)
    assert done["status"] == "discarded", done
    assert "'nobody' is not a child this task spawned" in done["last_error"]
    assert done["attempts"] <= 2  # the run that spawned "mine", the one that found "nobody" unknown

    other = await enqueue(client, auth_headers, kind="noop", payload={})
    foreign = await enqueue(
        client, auth_headers, kind="test.gather_stranger", payload={"stranger": other["id"]}
    )
    done = await wait_done(client, auth_headers, foreign["id"], timeout=10)
    assert done["status"] == "discarded", done
    assert f"task {other['id']} is not this task's child 'mine'" in done["last_error"]


async def test_a_child_retried_by_hand_after_its_parent_was_cancelled_runs(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A retry is allowed (its parent's retry then finds it completed by key): the sweep took the
    retried child for one the parent's cancel had skipped, and cancelled it again within a second."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/kids", json={"paused": True}, headers=auth_headers)
    parent = await enqueue(client, auth_headers, kind="test.fanout", payload={"children": 2, "queue": "kids"})
    await eventually(lambda: _status(clean_database, parent["id"], "waiting"))
    await client.post(f"/api/tasks/{parent['id']}/cancel", headers=auth_headers)
    children = await _children(client, auth_headers, parent["id"])
    assert [c["status"] for c in children] == ["cancelled", "cancelled"]
    retried = await client.post(f"/api/tasks/{children[0]['id']}/retry", headers=auth_headers)
    assert retried.status_code == 200
    await asyncio.sleep(2.5)  # two sweeps
    assert await _status(clean_database, children[0]["id"], "available")  # its queue is paused
    await client.put("/api/queues/kids", json={"paused": False}, headers=auth_headers)
    assert (await wait_done(client, auth_headers, children[0]["id"]))["status"] == "completed"


MIB = 1024 * 1024
STATE_FULL = "a task's steps and signals may hold at most 16 MiB of JSON in all"


async def test_steps_past_a_tasks_state_bound_fail_it_for_good_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A task's stored state had no bound in bytes: 1,000 steps of up to 1 MiB each (1 GB), all of
    it loaded into the worker at every claim. Its steps and signals now hold at most 16 MiB; the
    step past it fails the task for good (no retry re-runs it), as an unstorable step does."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    # each step's result is 1,000,002 bytes of JSON: sixteen fit in 16 MiB, the seventeenth does not
    task = await enqueue(
        client, auth_headers, kind="test.limits", payload={"steps": 17, "step_bytes": 1_000_000}
    )
    done = await wait_done(client, auth_headers, task["id"], timeout=60)
    assert (done["status"], done["attempts"]) == ("discarded", 1), done
    assert done["last_error"] == f"step 's16' does not fit: {STATE_FULL}"
    stored = await fetch(
        clean_database,
        "SELECT (SELECT count(*) FROM task_steps WHERE task_id = t.id) AS n, t.state_bytes FROM tasks t "
        "WHERE t.id = $1",
        UUID(task["id"]),
    )
    assert (stored[0]["n"], stored[0]["state_bytes"]) == (16, 16 * 1_000_002)
    # inside the bound nothing changed: a task whose steps hold 15 MB completes
    fits = await enqueue(
        client, auth_headers, kind="test.limits", payload={"steps": 15, "step_bytes": 1_000_000}
    )
    assert (await wait_done(client, auth_headers, fits["id"], timeout=60))["status"] == "completed"


async def test_a_parent_whose_childrens_results_are_past_its_state_bound_fails_for_good_with_a_clear_error(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A gather loads every child's result into the parent's worker, and they were not counted in
    the parent's bound (10,000 children of up to 8 MiB each). They now count toward its 16 MiB:
    past it the parent is never loaded, it fails for good saying why; within it, it completes."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    # each child's result is 1,000,000 characters and a few more bytes: 17 are past 16 MiB
    parent = await enqueue(
        client, auth_headers, kind="test.fanout", payload={"children": 17, "pad": 1_000_000}
    )
    done = await wait_done(client, auth_headers, parent["id"], timeout=60)
    assert done["status"] == "discarded", done
    assert done["result"] is None
    sized = await fetch(
        clean_database,
        "SELECT sum(octet_length(result::text)) AS n FROM tasks WHERE parent_id = $1",
        UUID(parent["id"]),
    )
    assert done["last_error"] == (
        f"its stored state could not be loaded: its stored state and its children's results come to"
        f" {sized[0]['n']} bytes, past the 16777216 a task may load to replay: have its children return"
        " less (store large data elsewhere and return a reference to it), or gather fewer children in"
        " one task"
    )
    runs = await fetch(
        clean_database,
        "SELECT outcome FROM task_attempts WHERE task_id = $1 ORDER BY attempt",
        UUID(parent["id"]),
    )
    assert [r["outcome"] for r in runs] == ["suspended", "failed"]
    fits = await enqueue(client, auth_headers, kind="test.fanout", payload={"children": 15, "pad": 1_000_000})
    finished = await wait_done(client, auth_headers, fits["id"], timeout=60)
    assert finished["result"] == {"sum": sum(i * 2 for i in range(15)), "count": 15}


async def test_a_worker_holds_at_most_its_budget_of_loaded_state_across_claim_rounds(
    serving: Serving, auth_headers: dict[str, str], clean_database: str, tmp_path: Path
) -> None:
    """The 64 MiB budget held for one claim round only: the durable tasks it handed back were
    claimed and loaded by the next round, so a worker of concurrency 200 could hold 200 states of
    16 MiB at once. Now what its running tasks hold counts: past the budget its claims pass over
    durable tasks (no claim and hand-back loop) and take the others; the durable ones run as the
    budget frees, their attempts not spent."""
    app = await serving(**ALL_ROLES, WORKER_CONCURRENCY=50)
    client = app.test_client()
    spans = tmp_path / "spans.txt"
    durable = [
        await enqueue(
            client, auth_headers, kind="test.span", payload={"path": str(spans), "seconds": 1.0}, delay_s=1
        )
        for _ in range(8)
    ]
    ids = [UUID(t["id"]) for t in durable]
    # the counter is what the budget reads: eight states of 15 MiB, four of them fit in 64 MiB
    await fetch(
        clean_database,
        "UPDATE tasks SET durable = true, state_bytes = 15 * 1024 * 1024 WHERE id = ANY($1::uuid[])",
        ids,
    )
    plain = [await enqueue(client, auth_headers, kind="noop", payload={}, delay_s=1.2) for _ in range(10)]
    for task in durable:
        assert (await wait_done(client, auth_headers, task["id"]))["status"] == "completed"
    # the handlers that ran at once: never more than four
    runs = [(float(start), float(end)) for _, _, _, start, end in (line.split() for line in lines(spans))]
    assert len(runs) == 8
    assert max(sum(1 for s, e in runs if s <= at < e) for at, _ in runs) == 4
    rows = await fetch(
        clean_database,
        "SELECT id, status, attempts, started_at, finished_at FROM tasks WHERE id = ANY($1::uuid[])",
        ids + [UUID(t["id"]) for t in plain],
    )
    by_id = {str(r["id"]): r for r in rows}
    assert {by_id[t["id"]]["attempts"] for t in durable} == {1}
    # the plain tasks were not held up behind the durable ones waiting for budget
    assert all(by_id[t["id"]]["status"] == "completed" for t in plain)
    assert max(by_id[t["id"]]["finished_at"] for t in plain) < max(
        by_id[t["id"]]["started_at"] for t in durable
    )


async def test_signals_past_a_tasks_state_bound_or_its_pending_signals_cap_are_409_and_keep_nothing(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """Any number of signals of up to 8 MiB each could be sent to a task (each kept, each loaded
    into the worker at every claim of it). A signal that would take the task's steps and signals
    past 16 MiB, or one more when 1,000 are kept that no wait received, is now a 409 naming why."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.await_signal", payload={"name": "go"})
    await eventually(lambda: _status(clean_database, task["id"], "waiting"))
    big = {"data": "x" * 7_000_000}  # 7,000,002 bytes of JSON
    for name in ("a", "b"):
        sent = await client.post(f"/api/tasks/{task['id']}/signals/{name}", json=big, headers=auth_headers)
        assert sent.status_code == 202, await sent.get_data(as_text=True)
    refused = await client.post(f"/api/tasks/{task['id']}/signals/c", json=big, headers=auth_headers)
    assert refused.status_code == 409
    assert refused.headers["Content-Type"] == "application/problem+json"
    detail = (await refused.get_json())["detail"]
    assert "14000004 bytes" in detail, detail
    assert "16 MiB" in detail, detail
    kept = await fetch(clean_database, "SELECT name FROM task_signals WHERE task_id = $1", UUID(task["id"]))
    assert sorted(r["name"] for r in kept) == ["a", "b"]
    # what fits is still kept and delivered
    go = await client.post(
        f"/api/tasks/{task['id']}/signals/go", json={"data": {"ok": 1}}, headers=auth_headers
    )
    assert go.status_code == 202
    assert (await wait_done(client, auth_headers, task["id"]))["result"] == {"data": {"ok": 1}}

    later = await enqueue(client, auth_headers, kind="noop", payload={}, delay_s=3600)
    await fetch(
        clean_database,
        "INSERT INTO task_signals (task_id, name, data) "
        "SELECT $1, 's' || i, 'null'::jsonb FROM generate_series(1, 1000) AS i",
        UUID(later["id"]),
    )
    more = await client.post(f"/api/tasks/{later['id']}/signals/more", json={"data": 1}, headers=auth_headers)
    assert more.status_code == 409
    assert "1000 signals that no wait has received" in (await more.get_json())["detail"]
    again = await client.post(f"/api/tasks/{later['id']}/signals/s1", json={"data": 1}, headers=auth_headers)
    assert again.status_code == 409
    assert "already received" in (await again.get_json())["detail"]
    count = await fetch(
        clean_database, "SELECT count(*) AS n FROM task_signals WHERE task_id = $1", UUID(later["id"])
    )
    assert count[0]["n"] == 1000


async def test_a_tasks_steps_are_listed_in_pages_bounded_in_count_and_bytes(
    serving: Serving, auth_headers: dict[str, str]
) -> None:
    """GET /api/tasks/{id}/steps answered every step at once (up to 1,000 of 1 MiB: one answer of
    1 GB built in the API process). It pages now (keyset: limit, cursor); by default a page holds
    every step unless their results pass 4 MiB."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    task = await enqueue(
        client, auth_headers, kind="test.limits", payload={"steps": 6, "step_bytes": 1_000_000}
    )
    assert (await wait_done(client, auth_headers, task["id"], timeout=60))["status"] == "completed"
    path = f"/api/tasks/{task['id']}/steps"
    first = await get(client, auth_headers, path)
    assert [s["name"] for s in first["items"]] == ["s0", "s1", "s2", "s3"]  # 4,000,008 bytes: 4 MiB
    assert first["next_cursor"]
    rest = await get(client, auth_headers, f"{path}?cursor={first['next_cursor']}")
    assert ([s["name"] for s in rest["items"]], rest["next_cursor"]) == (["s4", "s5"], None)
    assert rest["items"][0]["result"] == "x" * 1_000_000

    small = await enqueue(client, auth_headers, kind="test.limits", payload={"steps": 5})
    await wait_done(client, auth_headers, small["id"])
    names, cursor, pages = [], None, 0
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await get(client, auth_headers, f"/api/tasks/{small['id']}/steps{query}")
        names += [s["name"] for s in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert (names, pages) == (["s0", "s1", "s2", "s3", "s4"], 3)
    whole = await get(client, auth_headers, f"/api/tasks/{small['id']}/steps")
    assert ([s["result"] for s in whole["items"]], whole["next_cursor"]) == ([0, 1, 2, 3, 4], None)
    forged = base64.urlsafe_b64encode(json.dumps(["9999-12-31T23:59:59-14:00", "s0"]).encode()).decode()
    for cursor in ("nonsense", forged):  # the second, a time with no UTC reading, failed in the driver
        bad = await client.get(f"/api/tasks/{small['id']}/steps?cursor={cursor}", headers=auth_headers)
        assert bad.status_code == 422
        assert (await bad.get_json())["errors"][0]["field"] == "query.cursor"


async def test_the_same_signal_sent_again_is_answered_as_the_first_and_delivered_once(
    serving: Serving, auth_headers: dict[str, str], clean_database: str
) -> None:
    """A signal answered 503 after its commit, or whose answer was lost, and sent again was a 409
    "already received": the SDK raised for a signal that had been delivered. The same name and
    data sent again is answered 202 (the task's status now) and kept once; other data is a 409."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="test.await_signal", queue="held", payload={"name": "go"})
    path = f"/api/tasks/{task['id']}/signals/go"
    first = await client.post(path, json={"data": {"n": 1, "m": [1, 2]}}, headers=auth_headers)
    assert first.status_code == 202
    again = await client.post(path, json={"data": {"m": [1, 2], "n": 1}}, headers=auth_headers)
    assert again.status_code == 202, await again.get_data(as_text=True)
    assert await again.get_json() == await first.get_json()
    other = await client.post(path, json={"data": {"n": 2, "m": [1, 2]}}, headers=auth_headers)
    assert other.status_code == 409
    kept = await fetch(clean_database, "SELECT data FROM task_signals WHERE task_id = $1", UUID(task["id"]))
    assert len(kept) == 1
    await client.post("/api/queues/held/resume", headers=auth_headers)
    done = await wait_done(client, auth_headers, task["id"])
    assert done["result"] == {"data": {"n": 1, "m": [1, 2]}}
    # delivered and finished: the same signal sent again still gets the first one's answer
    late = await client.post(path, json={"data": {"n": 1, "m": [1, 2]}}, headers=auth_headers)
    assert late.status_code == 202
    assert (await late.get_json())["status"] == "completed"
    attempts = await get(client, auth_headers, f"/api/tasks/{task['id']}/attempts")
    assert [a["outcome"] for a in attempts["items"]].count("completed") == 1


async def test_a_child_spawned_inside_a_step_is_created_though_a_later_step_fails_first(
    serving: Serving, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """A step's function that spawns a child: the step is stored together with its child. The step
    alone was stored, the child waiting for the next suspension; a later step that failed ended the
    attempt first, and the retry replayed the step from storage without its spawn: the child was
    never created (a gather then failed the task for good, and a task that did not gather completed
    without its child ever running)."""
    app = await serving(**ALL_ROLES)
    client = app.test_client()
    await client.put(
        "/api/queues/shop", json={"min_backoff_s": 0.1, "max_backoff_s": 0.2}, headers=auth_headers
    )
    done: dict[bool, dict[str, Any]] = {}
    for gather in (True, False):
        marks = tmp_path / f"child-{gather}.txt"
        task = await enqueue(
            client, auth_headers, kind="test.spawn_in_step", queue="shop", max_attempts=5,
            payload={"path": str(marks), "failed_once": str(tmp_path / f"failed-{gather}"), "gather": gather},
        )  # fmt: skip
        done[gather] = await wait_done(client, auth_headers, task["id"])
        listed = await get(client, auth_headers, "/api/tasks?kind=test.child&queue=shop&limit=10")
        children = listed["items"]
        mine = [c for c in children if c["parent_id"] == task["id"]]
        assert len(mine) == 1, (done[gather], children)
        child = await wait_done(client, auth_headers, mine[0]["id"])
        assert child["status"] == "completed"
        assert len(lines(marks)) == 1  # the child ran, once
    assert done[True]["status"] == "completed", done[True]
    assert done[True]["result"] == {"child": {"value": 14}}
    assert done[False]["status"] == "completed", done[False]
    assert done[False]["result"] == {"charged": True}
