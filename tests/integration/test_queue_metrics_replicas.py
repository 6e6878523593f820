"""Queue gauges come from one scheduler replica at a time: the one elected for the period exports
every queue (zeros included); a replica that another holds the period from exports none, so a
dashboard's sum over replicas is not multiplied by their number."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from app.database import Database
from app.scheduler import Scheduler
from app.settings import Settings
from app.src.utils.metrics import clear_queue_gauges
from tests.task_harness import enqueue, fetch


def depth_samples() -> dict[tuple[str, str], float]:
    return {
        (s.labels["queue"], s.labels["status"]): s.value
        for family in REGISTRY.collect()
        if family.name == "taskgate_queue_depth"
        for s in family.samples
    }


async def test_only_the_elected_replica_exports_queue_depth(
    serving: Any, auth_headers: dict[str, str], db: Database, settings: Settings, clean_database: str
) -> None:
    client = (await serving(ROLES=["api"])).test_client()
    await client.put("/api/queues/empty", json={}, headers=auth_headers)
    await enqueue(client, auth_headers, kind="noop", queue="busy", delay_s=3600)
    first, second = Scheduler(db, settings), Scheduler(db, settings)
    job = next(j for j in first.jobs if j.name == "queue_metrics")
    try:
        await first._run(job)
        assert depth_samples()[("busy", "scheduled")] == 1
        assert depth_samples()[("empty", "available")] == 0
        # another replica ticks in the same period: it loses the election and exports nothing
        await second._run(next(j for j in second.jobs if j.name == "queue_metrics"))
        assert depth_samples() == {}
        (row,) = await fetch(clean_database, "SELECT runs FROM maintenance_jobs WHERE name = 'queue_metrics'")
        assert row["runs"] == 1
    finally:
        clear_queue_gauges()
