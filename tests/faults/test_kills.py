"""(3) A kill -9 loop of worker processes under load; (5) two replicas, one killed -9."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.faults.common import prepare, running
from tests.faults.load import Answers, enqueue_load, http_task, wait_completed
from tests.faults.procs import Deployment
from tests.faults.report import Promises
from tests.faults.sink import Sink

pytestmark = pytest.mark.faults

CYCLES = 4


@pytest.mark.timeout(300)
async def test_kill_loop_of_workers(deployment: Deployment, sink: Sink) -> None:
    promises = Promises("3 kill -9 loop")
    api = deployment.server("api", roles="api,scheduler")  # the API and the lease rescuer
    workers = [deployment.worker("w0"), deployment.worker("w1")]
    await deployment.ready(api, *workers)
    headers = await prepare(deployment, api)
    answers = Answers()
    in_flight_at_kills: list[int] = []
    async with deployment.session(api) as http:
        async with running(
            lambda stop: enqueue_load(
                http, headers, answers, stop, lambda: http_task(sink.url(1.0)), clients=3
            )
        ):
            await asyncio.sleep(3)
            for cycle in range(CYCLES):
                slot = cycle % 2
                victim = workers[slot]
                # every delivery open now is an upper bound of what the victim holds
                in_flight_at_kills.append(sink.in_flight())
                victim.signal(signal.SIGKILL)
                await victim.wait_exit(10)
                workers[slot] = deployment.worker(f"w{slot}")
                await deployment.ready(workers[slot])
                await asyncio.sleep(2.5)
            await asyncio.sleep(1)
        counts, _ = await wait_completed(deployment.db_uri, answers.created, timeout=90)

    figures = answers.figures()
    overlaps = sink.overlapping_tasks()
    duplicates = sink.duplicates()
    bound = sum(in_flight_at_kills)
    not_completed = sum(n for s, n in counts.items() if s != "completed")
    promises.record(
        **figures,
        kills=CYCLES,
        in_flight_at_kills=in_flight_at_kills,
        duplicates=duplicates,
        duplicate_bound=bound,
        overlaps=len(overlaps),
        sink=sink.spans_summary(),
        not_completed=not_completed,
        task_statuses=dict(counts),
    )
    promises.check(not overlaps, f"{len(overlaps)} tasks had two overlapping executions at the sink")
    promises.check(
        duplicates <= bound, f"{duplicates} duplicates, more than the {bound} in flight at the kills"
    )
    promises.check(not_completed == 0, f"201 tasks not completed: {dict(counts)}")
    promises.check(figures["500s"] == 0, f"{figures['500s']} answers were 5xx other than 503")
    promises.verify()


@pytest.mark.timeout(240)
async def test_two_replicas_one_killed(deployment: Deployment, sink: Sink) -> None:
    promises = Promises("5 replica kill -9")
    survivor = deployment.server("survivor")
    victim = deployment.server("victim")
    await deployment.ready(survivor, victim)
    headers = await prepare(deployment, survivor)
    on_survivor, on_victim = Answers(), Answers()
    async with deployment.session(survivor) as http_s, deployment.session(victim) as http_v:

        def body() -> dict[str, object]:
            return http_task(sink.url(1.5))

        async with running(lambda stop: enqueue_load(http_s, headers, on_survivor, stop, body, clients=2)):
            async with running(lambda stop: enqueue_load(http_v, headers, on_victim, stop, body, clients=2)):
                await asyncio.sleep(4)
                in_flight = sink.in_flight()
                killed_at = victim.signal(signal.SIGKILL)
                await victim.wait_exit(10)
            await asyncio.sleep(4)
        created = on_survivor.created + on_victim.created
        counts, took = await wait_completed(deployment.db_uri, created, timeout=90)
    all_done_at = time.time()

    before_kill = [a for a in on_victim.items if a.end < killed_at]
    figures = Answers(on_survivor.items + before_kill).figures()
    overlaps = sink.overlapping_tasks()
    duplicates = sink.duplicates()
    not_completed = sum(n for s, n in counts.items() if s != "completed")
    promises.record(
        **figures,
        in_flight_at_kill=in_flight,
        duplicates=duplicates,
        overlaps=len(overlaps),
        recovery_s=round(all_done_at - killed_at, 2),
        sink=sink.spans_summary(),
        not_completed=not_completed,
        task_statuses=dict(counts),
        wait_for_completion_s=round(took, 2),
    )
    promises.check(not overlaps, f"{len(overlaps)} tasks had two overlapping executions at the sink")
    promises.check(
        duplicates <= in_flight, f"{duplicates} duplicates, more than the {in_flight} in flight at the kill"
    )
    promises.check(not_completed == 0, f"201 tasks not completed: {dict(counts)}")
    promises.check(figures["500s"] == 0, f"{figures['500s']} answers were 5xx other than 503")
    promises.check(survivor.alive(), "the surviving replica died")
    promises.verify()
