"""Prometheus metrics: defined once at import (plain objects, no threads), observed everywhere."""

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("taskgate_http_requests_total", "HTTP requests served", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "taskgate_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TASK_OUTCOMES = Counter(
    "taskgate_task_outcomes_total",
    "Finished task attempts by outcome",
    ["queue", "kind", "outcome"],
)
TASKS_ENQUEUED = Counter("taskgate_tasks_enqueued_total", "Tasks accepted", ["queue", "kind"])
QUEUE_DEPTH = Gauge(
    "taskgate_queue_depth",
    "Unfinished tasks per queue and status, every queue (zeros included); exported by the one "
    "scheduler replica elected for the period: aggregate with max/sum by (queue)",
    ["queue", "status"],
)
QUEUE_OLDEST_AVAILABLE = Gauge(
    "taskgate_queue_oldest_available_age_seconds",
    "Age of the oldest task that is due and not yet claimed, per queue (0 when none waits)",
    ["queue"],
)
UNFINISHED_STATUSES = ("scheduled", "available", "running", "waiting", "retryable")
OTHER_QUEUES = "_other"  # queues beyond METRICS_MAX_QUEUES, summed
START_LAG = Histogram(
    "taskgate_task_start_lag_seconds",
    "Time from a task becoming due to a worker starting it",
    ["queue"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
WORKER_RUNNING = Gauge("taskgate_worker_running_tasks", "Tasks this process is running now (slots in use)")
WORKER_CAPACITY = Gauge(
    "taskgate_worker_capacity_tasks", "Tasks this process may hold at once (WORKER_CONCURRENCY)"
)
REMOTE_CLAIM_STATE = Gauge(
    "taskgate_remote_claim_state_bytes",
    "Loaded durable state (steps, signals, children's results) that remote claims in this process "
    "hold until their answers are sent, of MAX_LOADED_STATE_BYTES (256 MiB); claims that find too "
    "little left wait for it",
)
TASK_DURATION = Histogram(
    "taskgate_task_duration_seconds",
    "How long an attempt ran, from claim to its handler's end",
    ["queue", "kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
SCHEDULER_RUNS = Counter("taskgate_scheduler_runs_total", "Maintenance job runs", ["job", "outcome"])
SCHEDULER_DURATION = Histogram("taskgate_scheduler_run_duration_seconds", "Maintenance job duration", ["job"])
SCHEDULER_LAST_SUCCESS = Gauge(
    "taskgate_scheduler_last_success_timestamp_seconds", "Last successful run", ["job"]
)
SCHEDULE_FIRES = Counter(
    "taskgate_schedule_fires_total",
    "Tasks made by user schedules: on_time, missed (beyond the grace; coalesced), manual",
    ["outcome"],
)


def export_queue_gauges(rows: list[dict[str, Any]], *, max_queues: int) -> None:
    """Set the queue gauges from queue_depths rows (name, status, n, oldest_s).

    Queue names come from clients, so the label values are bounded: the `max_queues` deepest
    queue names (ties by name) get their own series, the rest are summed under `_other`.
    """
    depth: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    for row in rows:
        counts = depth.setdefault(row["name"], dict.fromkeys(UNFINISHED_STATUSES, 0))
        if row["status"] is not None:
            counts[row["status"]] += int(row["n"])
        if row["oldest_s"] is not None:
            oldest[row["name"]] = max(oldest.get(row["name"], 0.0), float(row["oldest_s"]))
    ranked = sorted(depth, key=lambda name: (-sum(depth[name].values()), name))
    shown = set(ranked[:max_queues])
    labelled: dict[str, dict[str, int]] = {}
    ages: dict[str, float] = {}
    for name, counts in depth.items():
        label = name if name in shown else OTHER_QUEUES
        into = labelled.setdefault(label, dict.fromkeys(UNFINISHED_STATUSES, 0))
        for status, n in counts.items():
            into[status] += n
        ages[label] = max(ages.get(label, 0.0), oldest.get(name, 0.0))
    clear_queue_gauges()
    for label, counts in labelled.items():
        for status, n in counts.items():
            QUEUE_DEPTH.labels(label, status).set(n)
        QUEUE_OLDEST_AVAILABLE.labels(label).set(round(ages[label], 3))


def clear_queue_gauges() -> None:
    QUEUE_DEPTH.clear()
    QUEUE_OLDEST_AVAILABLE.clear()


# Label sets a metric labelled by client input (queue names, kinds, hosts) gets in one process;
# past them, new values are counted under `_other`: clients cannot grow the series without bound.
MAX_SERIES = 1000


class LabelCache:
    """Children of a labelled metric, looked up once per label set (labels() is costly per task).

    `spill` names the positions of labels that come from clients: once the metric has
    `max_series` label sets, a new set is counted with those positions as `_other`."""

    def __init__(
        self,
        metric: Counter | Histogram | Gauge,
        *,
        spill: tuple[int, ...] = (),
        max_series: int = MAX_SERIES,
    ) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._spill = spill
        self._max_series = max_series

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            if self._spill and len(self._children) >= self._max_series:
                labels = tuple(OTHER_QUEUES if i in self._spill else value for i, value in enumerate(labels))
                child = self._children.get(labels)
                if child is not None:
                    return child
            child = self._children[labels] = self._metric.labels(*labels)
        return child


OUTCOMES = LabelCache(TASK_OUTCOMES, spill=(0, 1))  # queue, kind (the outcome is ours)
ENQUEUED = LabelCache(TASKS_ENQUEUED, spill=(0, 1))
LAG = LabelCache(START_LAG, spill=(0,))
DURATION = LabelCache(TASK_DURATION, spill=(0, 1))
# The `http` kind, per destination host (host:port)
HTTP_DELIVERIES = Counter(
    "taskgate_http_deliveries_total",
    "Outbound HTTP requests of `http` tasks by destination host and outcome",
    ["host", "outcome"],
)
HTTP_DELIVERY_LATENCY = Histogram(
    "taskgate_http_delivery_duration_seconds",
    "Outbound HTTP request latency (to the response headers and the first 64 KiB of body)",
    ["host"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
HTTP_HOST_LIMIT = Gauge(
    "taskgate_http_host_limit",
    "a destination host's adaptive concurrency limit (AIMD: halves on 429, 503 and timeouts, grows by one "
    "after each window of successes), cluster-wide",
    ["host"],
)
HTTP_HOST_IN_FLIGHT = Gauge(
    "taskgate_http_host_in_flight", "requests in flight to a destination host, across every worker", ["host"]
)
HTTP_HOST_UNHEALTHY = Gauge(
    "taskgate_http_host_unhealthy",
    "1 while a destination host's circuit is open or half-open (consecutive failures at the threshold)",
    ["host"],
)

DELIVERIES = LabelCache(HTTP_DELIVERIES, spill=(0,))  # host (the outcome is ours)
DELIVERY_LATENCY = LabelCache(HTTP_DELIVERY_LATENCY, spill=(0,))
