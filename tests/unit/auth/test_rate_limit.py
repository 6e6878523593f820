"""The per-client token bucket, on a fake clock."""

import uuid

from app.src.api.auth.rate_limit import TokenBuckets, retry_after_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_steady_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(burst_s=2.0, clock=clock)
    client = uuid.uuid4()
    assert [buckets.take(client, rate=5) for _ in range(10)] == [0.0] * 10  # two seconds' worth
    wait = buckets.take(client, rate=5)
    assert wait > 0
    assert wait <= 0.2
    clock.now += 0.2
    assert buckets.take(client, rate=5) == 0.0
    assert buckets.take(client, rate=5) > 0


def test_slow_rates_still_admit_one_request() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    client = uuid.uuid4()
    assert buckets.take(client, rate=0.1) == 0.0
    wait = buckets.take(client, rate=0.1)
    assert 9 < wait <= 10
    assert retry_after_seconds(wait) == 10
    assert retry_after_seconds(0.01) == 1


def test_clients_do_not_share_buckets_and_memory_is_bounded() -> None:
    clock = Clock()
    buckets = TokenBuckets(burst_s=1.0, max_clients=3, clock=clock)
    busy = uuid.uuid4()
    buckets.take(busy, rate=1)
    assert buckets.take(busy, rate=1) > 0
    assert buckets.take(uuid.uuid4(), rate=1) == 0.0
    for _ in range(5):
        buckets.take(uuid.uuid4(), rate=1)
    assert len(buckets._buckets) == 3
