"""(1) PostgreSQL stopped for ~5 s under enqueue load, then started again."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.common import prepare, running
from tests.faults.load import Answers, enqueue_load, http_task, poll_ready, timed, wait_completed
from tests.faults.pg import PgCluster
from tests.faults.procs import Deployment
from tests.faults.report import Promises
from tests.faults.sink import Sink

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

OUTAGE_S = 5.0


async def test_postgres_stopped_under_load(deployment: Deployment, cluster: PgCluster, sink: Sink) -> None:
    promises = Promises("1 db stop 5s")
    server = deployment.server("serve")
    worker = deployment.worker("worker")
    await deployment.ready(server, worker)
    headers = await prepare(deployment, server)
    answers = Answers()
    ready_log: list[tuple[float, float, int, object]] = []
    async with deployment.session(server) as http, deployment.session(server) as probe:

        def body() -> dict[str, object]:
            return http_task(sink.url(0.05))

        async with running(
            lambda stop: enqueue_load(http, headers, answers, stop, body, clients=4),
            lambda stop: poll_ready(probe, stop, ready_log),
        ):
            await asyncio.sleep(2)
            # a backlog that becomes due while the database is down: workers must claim it as
            # soon as PostgreSQL is back (this is what the recovery time measures)
            delayed = [{**http_task(sink.url(0.05)), "delay_s": 1.0} for _ in range(50)]
            answer, created = await timed(
                http, "POST", "/api/tasks/batch", json={"tasks": delayed}, headers=headers
            )
            assert answer.status == 201, answer
            answers.created += [str(t["id"]) for t in created["items"]]
            await asyncio.sleep(0.5)
            stopped_at = await asyncio.to_thread(cluster.stop, "fast")
            await asyncio.sleep(OUTAGE_S)
            back_at = await asyncio.to_thread(cluster.start)
            await asyncio.sleep(8)
        counts, _ = await wait_completed(deployment.db_uri, answers.created, timeout=60)

    outage = answers.between(stopped_at, back_at)
    figures = answers.figures()
    first_claim = sink.first_start_after(back_at)
    ready_again = next((s for s, _, status, _ in ready_log if s >= back_at and status == 200), None)
    unready_seen = any(stopped_at <= s <= back_at and status == 503 for s, _, status, _ in ready_log)
    ready_max = max((e - s for s, e, _, _ in ready_log), default=0.0)
    not_completed = sum(n for s, n in counts.items() if s != "completed")
    promises.record(
        **figures,
        outage_answers=answers.figures(outage),
        outage_s=round(back_at - stopped_at, 2),
        recovery_s=round(first_claim - back_at, 2) if first_claim else None,
        ready_again_s=round(ready_again - back_at, 2) if ready_again else None,
        ready_max_answer_s=round(ready_max, 2),
        duplicates=sink.duplicates(),
        sink=sink.spans_summary(),
        overlaps=len(sink.overlapping_tasks()),
        not_completed=not_completed,
        task_statuses=dict(counts),
    )
    promises.check(figures["500s"] == 0, f"{figures['500s']} answers were 5xx other than 503")
    promises.check(figures["max_answer_s"] <= 5, f"slowest answer took {figures['max_answer_s']} s (> 5 s)")
    promises.check(figures["no_answer"] == 0, f"{figures['no_answer']} requests got no HTTP answer")
    promises.check(answers.figures(outage)["503s"] > 0, "no 503 while the database was down")
    promises.check(
        figures["503s_without_retry_after"] == 0,
        f"{figures['503s_without_retry_after']} 503s without Retry-After",
    )
    promises.check(not_completed == 0, f"201 tasks not completed: {dict(counts)}")
    promises.check(
        first_claim is not None and first_claim - back_at <= 2,
        f"workers claimed again {None if first_claim is None else round(first_claim - back_at, 2)} s "
        "after the database returned (> 2 s)",
    )
    promises.check(unready_seen, "readiness never reported 503 while the database was down")
    promises.check(ready_again is not None, "readiness never true again after the database returned")
    promises.check(ready_max <= 5, f"a readiness answer took {ready_max:.1f} s (> 5 s)")
    promises.check(server.alive() and worker.alive(), "a process died during the outage")
    promises.verify()
