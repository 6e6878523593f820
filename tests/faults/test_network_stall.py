"""(2) A 20 s network stall between one replica and PostgreSQL; another replica keeps access."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tests.faults.common import prepare, running
from tests.faults.load import Answers, enqueue_load, http_task, poll_ready, query, wait_completed
from tests.faults.procs import Deployment
from tests.faults.report import Promises
from tests.faults.sink import Sink
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

STALL_S = 20.0
LONG_HOLD_S = 7.0  # longer than the lease (4 s): a worker that cannot renew must let go first
DETECT_S = 5.0  # readiness may be stale this long after the stall begins, never longer


async def test_stall_between_one_replica_and_postgres(deployment: Deployment, sink: Sink) -> None:
    promises = Promises("2 stall 20s")
    host, port = "127.0.0.1", int(deployment.db_uri.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(host=host, port=port)
    await proxy.start()
    stalled_uri = deployment.db_uri.replace(f":{port}/", f":{proxy.port}/")
    # plenty of worker slots: a rescued task must not wait behind a backlog to be run again, or a
    # second execution could not start while the first still runs, and overlaps would go unseen
    stalled = deployment.server("stalled", roles="api,worker", db_uri=stalled_uri, WORKER_CONCURRENCY="1000")
    healthy = deployment.server("healthy", WORKER_CONCURRENCY="1000")  # api, worker, scheduler (rescuer)
    try:
        await deployment.ready(stalled, healthy)
        headers = await prepare(deployment, healthy)
        counter = itertools.count()

        def body() -> dict[str, object]:
            hold = LONG_HOLD_S if next(counter) % 8 == 0 else 0.1
            return http_task(sink.url(hold), timeout_s=30)

        on_stalled, on_healthy = Answers(), Answers()
        ready_log: list[tuple[float, float, int, object]] = []
        async with (
            deployment.session(stalled) as http_s,
            deployment.session(healthy) as http_h,
            deployment.session(stalled) as probe,
        ):
            async with running(
                lambda stop: enqueue_load(http_s, headers, on_stalled, stop, body, clients=3),
                lambda stop: enqueue_load(http_h, headers, on_healthy, stop, body, clients=3),
                lambda stop: poll_ready(probe, stop, ready_log),
            ):
                await asyncio.sleep(5)
                in_flight = sink.in_flight()
                held = await query(
                    deployment.db_uri,
                    "SELECT count(*) AS n FROM tasks WHERE status = 'running'",
                )
                proxy.freeze()
                frozen_at = time.time()  # the stall starts here, not before the query above
                await asyncio.sleep(STALL_S / 2)
                # halfway: leases the stalled replica held have expired; has the rescuer taken them?
                unrescued = await query(
                    deployment.db_uri,
                    "SELECT count(*) AS n FROM tasks WHERE status = 'running' AND lease_expires_at < now()",
                )
                sessions = await query(
                    deployment.db_uri,
                    "SELECT state, count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() GROUP BY state",
                )
                await asyncio.sleep(STALL_S / 2)
                proxy.resume()
                resumed_at = time.time()
                await asyncio.sleep(8)
            created = on_stalled.created + on_healthy.created
            counts, _ = await wait_completed(deployment.db_uri, created, timeout=90)
    finally:
        await proxy.close()

    # answered while the stall lasted, to requests made during it: an answer to a request made
    # just before the freeze (its statement already through) or answered after the resume may
    # rightly be a 201; the slowest-answer promise bounds those
    during = [a for a in on_stalled.items if frozen_at <= a.start and a.end <= resumed_at]
    open_at_freeze = [
        ds
        for ds in sink.deliveries.values()
        if any(d.start <= frozen_at and (d.end or 1e18) > frozen_at for d in ds)
    ]
    redelivered = sum(1 for ds in open_at_freeze if len(ds) > 1)
    stalled_figures = on_stalled.figures()
    healthy_figures = on_healthy.figures()
    all_figures = Answers(on_stalled.items + on_healthy.items, created).figures()
    stale_ready = [
        (s, status)
        for s, e, status, body in ready_log
        if frozen_at + DETECT_S <= s and e <= resumed_at and status == 200
    ]
    ready_max = max((e - s for s, e, _, _ in ready_log), default=0.0)
    during_bad = [a for a in during if not (a.status == 503 and a.retry_after)]
    back = next((a.start for a in on_stalled.items if a.start >= resumed_at and a.status == 201), None)
    not_completed = sum(n for s, n in counts.items() if s != "completed")
    overlaps = sink.overlapping_tasks()
    promises.record(
        **all_figures,
        stalled_replica=stalled_figures,
        healthy_replica=healthy_figures,
        stalled_answers_during_stall=Answers(during).figures(),
        in_flight_at_freeze=in_flight,
        running_at_freeze=held[0]["n"],
        open_at_freeze_redelivered=redelivered,
        expired_leases_unrescued_mid_stall=unrescued[0]["n"],
        db_sessions_mid_stall={str(r["state"]): r["n"] for r in sessions},
        stale_ready_answers=len(stale_ready),
        ready_max_answer_s=round(ready_max, 2),
        recovery_s=round(back - resumed_at, 2) if back else None,
        duplicates=sink.duplicates(),
        sink=sink.spans_summary(),
        overlaps=len(overlaps),
        not_completed=not_completed,
        task_statuses=dict(counts),
    )
    promises.check(all_figures["500s"] == 0, f"{all_figures['500s']} answers were 5xx other than 503")
    promises.check(
        all_figures["max_answer_s"] <= 5, f"slowest answer took {all_figures['max_answer_s']} s (> 5 s)"
    )
    promises.check(all_figures["no_answer"] == 0, f"{all_figures['no_answer']} requests got no HTTP answer")
    promises.check(
        not during_bad,
        f"{len(during_bad)} of {len(during)} answers of the stalled replica during the stall were not "
        "503 + Retry-After",
    )
    promises.check(
        not stale_ready, f"readiness said 200 {len(stale_ready)} times more than {DETECT_S} s into the stall"
    )
    promises.check(ready_max <= 5, f"a readiness answer took {ready_max:.1f} s (> 5 s)")
    promises.check(not overlaps, f"{len(overlaps)} tasks had two overlapping executions at the sink")
    promises.check(not_completed == 0, f"201 tasks not completed: {dict(counts)}")
    promises.check(stalled.alive() and healthy.alive(), "a replica died during the stall")
    promises.verify()
