"""Queue gauges: every queue with zeros, and a bounded label set whatever names clients invent."""

from prometheus_client import REGISTRY

from app.src.utils.metrics import OTHER_QUEUES, clear_queue_gauges, export_queue_gauges


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_every_queue_gets_zeros_and_the_smallest_beyond_the_cap_are_summed() -> None:
    rows = [
        {"name": "idle", "status": None, "n": 0, "oldest_s": None},
        {"name": "busy", "status": "available", "n": 7, "oldest_s": 12.5},
        {"name": "busy", "status": "running", "n": 2, "oldest_s": None},
        # two clients' queues of one name add up
        {"name": "busy", "status": "available", "n": 1, "oldest_s": 3.0},
    ] + [{"name": f"tenant-made-{i}", "status": "available", "n": 1, "oldest_s": 1.0} for i in range(50)]
    try:
        export_queue_gauges(rows, max_queues=3)
        assert value("taskgate_queue_depth", queue="busy", status="available") == 8
        assert value("taskgate_queue_depth", queue="busy", status="retryable") == 0
        assert value("taskgate_queue_oldest_available_age_seconds", queue="busy") == 12.5
        queues = {
            s.labels["queue"]
            for m in REGISTRY.collect()
            if m.name == "taskgate_queue_depth"
            for s in m.samples
        }
        assert len(queues) == 3 + 1  # the cap, and one series set for the rest
        assert value("taskgate_queue_depth", queue=OTHER_QUEUES, status="available") == 48
        assert "idle" not in queues  # the cap keeps the deepest
        export_queue_gauges(rows[:1], max_queues=3)
        assert value("taskgate_queue_depth", queue="idle", status="available") == 0
        assert value("taskgate_queue_oldest_available_age_seconds", queue="idle") == 0
        assert value("taskgate_queue_depth", queue="busy", status="available") is None  # gone, not stale
    finally:
        clear_queue_gauges()
