"""Destination hosts of the `http` kind as GET /api/hosts shows them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class HostOut(BaseModel):
    host: str = Field(description="host:port, as the permits and the circuit name it")
    concurrency_limit: int = Field(
        description="requests in flight allowed now, cluster-wide: HTTP_HOST_MAX_CONCURRENCY, halved on "
        "429, 503 and timeouts, one more after each window of successes (AIMD)"
    )
    max_concurrency: int = Field(description="HTTP_HOST_MAX_CONCURRENCY, where the limit grows back to")
    in_flight: int = Field(description="requests holding a permit now, across every worker")
    circuit: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    error_rate: float = Field(description="failed share of the requests counted in the current minute (0-1)")
    recent_requests: int = Field(
        description="requests counted in the current minute (hosts that failed lately)"
    )


class HostList(BaseModel):
    items: list[HostOut]
    next_cursor: str | None = Field(default=None, description="the next page's `cursor`; null: the last page")
