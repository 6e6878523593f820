"""The built-in `http` kind: its one declaration (the handler body lives in delivery.py)."""

from __future__ import annotations

from app.src.api.http.delivery import deliver
from app.src.api.kinds import TaskContext, task_kind
from app.src.api.models.http import HttpPayload, HttpResult


@task_kind("http", payload=HttpPayload, result=HttpResult)
async def http(ctx: TaskContext, payload: HttpPayload) -> HttpResult:
    """Calls `url` reliably: signed per Standard Webhooks, retried on network errors, timeouts,
    408, 429 and 5xx (honouring Retry-After), discarded on other 4xx; with follow_async, a 202 +
    Location waits while the scheduler polls the status URL."""
    return await deliver(ctx, payload)
