"""Two scheduler replicas as real server processes on one database.

Each maintenance run happens once per period across both; a schedule firing every second makes
exactly one task per fire time; when the replica running the jobs is SIGKILLed, the other takes
over within a period, and the fires go on without a gap or a duplicate.
"""

import asyncio
import itertools
import json
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.conftest import ServerProcess, start_server, wait_ready
from tests.task_harness import eventually, fetch

PERIOD_S = 1.0  # RESCUE_INTERVAL_S of both replicas
RESCUE = "rescue_expired_leases"
# fires to count: about 6 s with both replicas, the kill, then about 4 s on the survivor alone
FIRES = 12


def log_records(server: ServerProcess) -> list[dict[str, Any]]:
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def replica_id(server: ServerProcess) -> str:
    [started] = [r for r in log_records(server) if r.get("event") == "scheduler started"]
    return str(started["replica"])


def run_times(server: ServerProcess, job: str) -> list[datetime]:
    return [
        datetime.fromisoformat(r["timestamp"])
        for r in log_records(server)
        if r.get("event") == "maintenance job ran" and r.get("job") == job
    ]


async def job_row(database_uri: str, job: str) -> Any:
    rows = await fetch(database_uri, "SELECT *, now() AS db_now FROM maintenance_jobs WHERE name = $1", job)
    return rows[0] if rows else None


async def test_two_replicas_run_each_period_once_fire_each_second_once_and_survive_a_kill(
    clean_database: str, tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    env = {"RESCUE_INTERVAL_S": PERIOD_S, "LOG_LEVEL": "DEBUG"}
    servers: list[ServerProcess] = list(
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    start_server, clean_database, tmp_path / name, roles="api,scheduler", env=env
                )
                for name in ("a", "b")
            )
        )
    )
    try:
        sessions = [
            aiohttp.ClientSession(base_url=s.base_url, connector=aiohttp.TCPConnector(ssl=s.ssl_context()))
            for s in servers
        ]
        try:
            await asyncio.gather(*(wait_ready(session, timeout=60) for session in sessions))
            async with sessions[0].post(
                "/api/schedules",
                json={"name": "tick", "cron": "* * * * * *", "timezone": "UTC", "task": {"kind": "noop"}},
                headers=auth_headers,
            ) as response:
                assert response.status == 201, await response.text()
                schedule = await response.json()

            # --- both alive: every period runs once, on one replica or the other ----------------
            first = await job_row(clean_database, RESCUE)
            await asyncio.sleep(5)
            second = await job_row(clean_database, RESCUE)
            elapsed = (second["db_now"] - first["db_now"]).total_seconds()
            runs = second["runs"] - first["runs"]
            assert elapsed / PERIOD_S - 2 <= runs <= elapsed / PERIOD_S + 1, (runs, elapsed)
            merged = sorted(itertools.chain.from_iterable(run_times(s, RESCUE) for s in servers))
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(merged)]
            assert min(gaps) > 0.6 * PERIOD_S, gaps  # never twice in one period
            prune = await job_row(clean_database, "prune")
            assert prune["runs"] == 1  # a 300 s period: one run for the whole cluster

            # --- SIGKILL the replica that runs the jobs, between two period boundaries ---------
            ids = {replica_id(s): s for s in servers}
            # between two boundaries, with the period's run finished (a victim killed mid-run
            # would leave its lease to expire first: that is the lease's job, not this test's)
            while True:
                while not 0.3 < time.time() % PERIOD_S < 0.6:  # ticks fall on whole seconds
                    await asyncio.sleep(0.01)
                holder = await _idle_holder(clean_database)
                if holder is not None and 0.3 < time.time() % PERIOD_S < 0.7:
                    break
                await asyncio.sleep(0.5)
            victim = ids[holder["started_by"]]
            survivor = next(s for s in servers if s is not victim)
            victim.stop(signal.SIGKILL, timeout=10)
            killed_at = (await fetch(clean_database, "SELECT now() AS now"))[0]["now"]
            taken = await eventually(
                lambda: _taken_over(clean_database, replica_id(survivor), killed_at), timeout=15
            )
            takeover_s = (taken["last_started_at"] - killed_at).total_seconds()
            # the next boundary, plus the tick's jitter: on a loaded 2-core machine a tick can come
            # most of a second late (1.65 s was seen while other suites ran beside this one)
            assert takeover_s < PERIOD_S + 1.0, takeover_s
            surviving = sessions[servers.index(survivor)]
            async with surviving.get("/api/common/ready") as response:
                assert response.status == 200

            # --- fires on after the kill: one task per fire time, no gaps, nothing coalesced ----
            await eventually(lambda: _fires_at_least(clean_database, FIRES), timeout=40)
            assert survivor.stop(signal.SIGTERM) == 0
            assert "scheduler stopped" in survivor.log()
        finally:
            for session in sessions:
                await session.close()
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)

    rows = await fetch(
        clean_database,
        "SELECT (schedule->>'fire_time')::timestamptz AS fire_time, "
        "schedule->>'coalesced_fires' AS coalesced FROM tasks ORDER BY 1",
    )
    times = [r["fire_time"] for r in rows]
    assert len(times) >= FIRES
    assert sum(t > killed_at for t in times) >= 3, "the survivor fired too few times to tell"
    assert len(set(times)) == len(times), "a fire time made two tasks"
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times)), "a fire time was skipped"
    assert {r["coalesced"] for r in rows} == {"0"}
    assert times[0] == datetime.fromisoformat(schedule["next_run_at"])
    [after] = await fetch(clean_database, "SELECT next_run_at FROM schedules")
    assert after["next_run_at"] == times[-1] + timedelta(seconds=1)
    ledger = await fetch(clean_database, "SELECT count(*) AS n FROM schedule_fires")
    assert ledger[0]["n"] == len(times)


async def _idle_holder(database_uri: str) -> Any:
    """The rescue job's row right after a run finished (no lease held)."""
    row = await job_row(database_uri, RESCUE)
    return row if row is not None and row["lease_expires_at"] is None and row["started_by"] else None


async def _taken_over(database_uri: str, survivor: str, killed_at: datetime) -> Any:
    row = await job_row(database_uri, RESCUE)
    ok = (
        row["started_by"] == survivor
        and row["last_started_at"] > killed_at
        and row["last_succeeded_at"] > killed_at
    )
    return row if ok else None


async def _fires_at_least(database_uri: str, n: int) -> bool:
    return int((await fetch(database_uri, "SELECT count(*) AS n FROM tasks"))[0]["n"]) >= n
