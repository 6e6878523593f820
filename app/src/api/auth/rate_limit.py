"""Request rate limit per API client: a token bucket in process memory.

Per process, on purpose: the check runs on every request, and a shared bucket would cost a
PostgreSQL write per request. With N API replicas a client may reach N times its rate; the
quotas that must hold cluster-wide (queued tasks, queue rate limits) live in PostgreSQL.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One bucket per client: `rate` tokens a second, holding at most `burst_s` seconds' worth."""

    def __init__(
        self,
        *,
        burst_s: float = 2.0,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst_s = burst_s
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[UUID, _Bucket] = OrderedDict()

    def take(self, client_id: UUID, *, rate: float) -> float:
        """0.0 when a request is admitted, else the seconds until the next one would be."""
        now = self._clock()
        capacity = max(1.0, rate * self.burst_s)
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _Bucket(tokens=capacity, updated=now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)  # forget the least recently seen client
        else:
            self._buckets.move_to_end(client_id)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


# A Retry-After no client should plan beyond; a rate near zero (an operator may set 1e-300 per
# second) makes the wait overflow to infinity, which has no whole number of seconds.
MAX_RETRY_AFTER_S = 86_400


def retry_after_seconds(wait: float) -> int:
    return max(1, math.ceil(min(wait, MAX_RETRY_AFTER_S)))
