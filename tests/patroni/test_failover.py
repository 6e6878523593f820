"""A switchover and a crash (kill -9 of patroni and postmaster) of the primary of a three-node
Patroni cluster with synchronous_mode on, while clients enqueue: no task answered 201 is lost,
every Taskgate process reconnects by itself, and the figures go to tests/patroni/results/.

The service is configured as in production: DB_URI lists every node with
target_session_attrs=read-write, nothing tells it which node is the primary.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tests.faults.common import QUEUE, prepare, running
from tests.faults.load import Answer, Answers, enqueue_load, poll_ready
from tests.faults.procs import Deployment, run_cli
from tests.patroni import cluster as patroni
from tests.patroni.cluster import PatroniCluster

pytestmark = [pytest.mark.patroni, pytest.mark.timeout(290)]

DATABASE = "taskgate"
RESULTS = Path(__file__).parent / "results"


def noop() -> dict[str, Any]:
    return {"queue": QUEUE, "kind": "noop", "payload": {}}


def window(answers: Answers, fault_at: float, until: float) -> dict[str, Any]:
    """What clients saw from a fault until `until`: errors by kind and how long until enqueues
    succeeded again (the end of the last failed answer after the fault)."""
    seen = [a for a in answers.items if fault_at <= a.end <= until]
    failed = [a for a in seen if a.status != 201]
    return {
        "answers": len(seen),
        "201s": sum(1 for a in seen if a.status == 201),
        "errors": len(failed),
        "errors_by_status": _by_status(failed),
        "503s_without_retry_after": sum(1 for a in failed if a.status == 503 and not a.retry_after),
        "seconds_to_recover": round(max((a.end for a in failed), default=fault_at) - fault_at, 2),
        "max_answer_s": round(max((a.seconds for a in seen), default=0.0), 2),
    }


def _by_status(items: list[Answer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for answer in items:
        counts[str(answer.status)] = counts.get(str(answer.status), 0) + 1
    return counts


async def on_leader(pg: PatroniCluster, sql: str, *args: Any) -> list[asyncpg.Record]:
    leader = pg.leader()
    assert leader is not None
    conn = await asyncpg.connect(pg.direct_dsn(leader, DATABASE), timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def wait_all_completed(pg: PatroniCluster, ids: list[str], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await on_leader(
            pg, "SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1::uuid[]) GROUP BY 1", ids
        )
        counts = {r["status"]: int(r["n"]) for r in rows}
        counts["missing"] = len(set(ids)) - sum(counts.values())
        if counts.get("completed", 0) + counts["missing"] == len(set(ids)) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


async def ready_again(http: Any, *, since: float, timeout: float = 30) -> float:
    """Seconds from `since` until readiness (database, migrations, scheduler) answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get("/api/common/ready") as answer:
            if answer.status == 200:
                return round(time.time() - since, 2)
            assert time.monotonic() < deadline, await answer.text()
        await asyncio.sleep(0.2)


async def test_switchover_and_crash_of_the_primary_lose_no_acknowledged_task(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    missing = patroni.available()
    if missing:
        pytest.skip(
            f"Patroni cluster cannot run here, missing: {missing} (apt-get install -y patroni etcd-server)"
        )
    pg = PatroniCluster(synchronous_mode=True)
    deployment: Deployment | None = None
    try:
        began = time.monotonic()
        await asyncio.to_thread(pg.start)
        cluster_s = time.monotonic() - began
        leader = pg.leader()
        assert leader is not None
        conn = await asyncpg.connect(pg.direct_dsn(leader), timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        uri = pg.uri(DATABASE)
        deployment = Deployment(uri, Fernet.generate_key().decode(), *certificate, tmp_path)
        await asyncio.to_thread(run_cli, ["migrate"], deployment.env())
        server = deployment.server("api", roles="api,scheduler")
        worker = deployment.worker("worker")
        await deployment.ready(server, worker)
        headers = await prepare(deployment, server)
        answers = Answers()
        ready_log: list[tuple[float, float, int, Any]] = []
        async with deployment.session(server) as http, deployment.session(server) as probe:
            async with running(
                lambda stop: enqueue_load(http, headers, answers, stop, noop, clients=4),
                lambda stop: poll_ready(probe, stop, ready_log),
            ):
                await asyncio.sleep(3)
                candidate = pg.sync_standby()
                assert candidate is not None
                switched_at = await asyncio.to_thread(pg.switchover, candidate)
                await asyncio.to_thread(pg.wait_for, lambda: pg.leader() is candidate, 60, "no switchover")
                switched_leader = candidate.name
                await asyncio.to_thread(pg.wait_healthy, 90)
                await asyncio.sleep(5)
                victim = pg.leader()
                assert victim is not None
                successor = pg.sync_standby()
                crashed_at = await asyncio.to_thread(pg.crash, victim)
                await asyncio.to_thread(
                    pg.wait_for,
                    lambda: (pg.leader() or victim) is not victim,
                    90,
                    "no failover after the crash",
                )
                promoted = pg.leader()
                promoted_after_s = time.time() - crashed_at
                await asyncio.sleep(8)  # load goes on against the new primary
            ended = time.time()
            counts = await wait_all_completed(pg, answers.created, timeout=60)
            await ready_again(http, since=crashed_at)
        unready = [s for s, _, status, _ in ready_log if s >= crashed_at and status != 200]
        ready_back = next(
            (s for s, _, status, _ in ready_log if unready and s > unready[-1] and status == 200), None
        )
        switchover = window(answers, switched_at, crashed_at)
        crash = window(answers, crashed_at, ended)
        assert server.alive()
        assert worker.alive()
        figures = {
            "synchronous_mode": True,
            "cluster_start_s": round(cluster_s, 1),
            "enqueued_201": len(answers.created),
            "task_statuses": counts,
            "lost": counts["missing"],
            "all_answers": len(answers.items),
            "switchover": {"to": switched_leader, **switchover},
            "crash": {
                "killed": victim.name,
                "promoted": promoted.name if promoted else None,
                "expected_successor": successor.name if successor else None,
                "promoted_after_s": round(promoted_after_s, 2),
                **crash,
            },
            # /api/common/ready: unready while no primary answers, ready again after this long
            "ready_again_after_crash_s": round(ready_back - crashed_at, 2) if ready_back else None,
            "server_alive": server.alive(),
            "worker_alive": worker.alive(),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(figures, indent=2) + "\n")
        print("\nPatroni failover figures:\n" + json.dumps(figures, indent=2))
        assert counts["missing"] == 0, f"{counts['missing']} tasks answered 201 are gone: {figures}"
        assert counts.get("completed", 0) == len(set(answers.created)), figures
        for phase in (switchover, crash):
            statuses = set(phase["errors_by_status"])
            assert statuses <= {"503"}, f"errors other than 503 (and Retry-After) under failover: {figures}"
            assert phase["503s_without_retry_after"] == 0, figures
        assert answers.items[-1].status == 201, figures  # enqueueing works again at the end
    finally:
        if deployment is not None:
            logs = {p.name: p.log(tail=3000) for p in deployment.procs}
            deployment.stop_all()
            (tmp_path / "process-logs.json").write_text(json.dumps(logs))
        await asyncio.to_thread(pg.destroy)
