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


def test_per_task_metrics_count_new_client_names_under_other_past_their_bound() -> None:
    """Queue names, kinds and hosts come from clients: one batch to 300 new queues once added 300
    series to every per-task metric, in every process, for ever."""
    from prometheus_client import Counter

    from app.src.utils.metrics import LabelCache

    counter = Counter(
        "taskgate_test_bounded_total", "a metric labelled by client input", ["queue", "outcome"]
    )
    bounded = LabelCache(counter, spill=(0,), max_series=3)
    for i in range(300):
        bounded(f"tenant-made-{i}", "completed").inc()
    bounded("tenant-made-0", "completed").inc()  # a set seen before the bound keeps its own series
    queues = {
        s.labels["queue"] for m in REGISTRY.collect() if m.name == "taskgate_test_bounded" for s in m.samples
    }
    assert queues == {"tenant-made-0", "tenant-made-1", "tenant-made-2", OTHER_QUEUES}
    assert value("taskgate_test_bounded_total", queue=OTHER_QUEUES, outcome="completed") == 297
    assert value("taskgate_test_bounded_total", queue="tenant-made-0", outcome="completed") == 2
    REGISTRY.unregister(counter)
