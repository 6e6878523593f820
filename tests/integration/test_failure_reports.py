"""What an operator reads about a failure: the reason of RetryLater and PermanentError in the log,
and the traceback of a Python failure on the console's task page."""

from __future__ import annotations

from typing import Any

import structlog
from structlog.testing import LogCapture

from app.src.api.models.auth import NewOperator
from tests.integration.ui.test_console import Browser, log_in
from tests.task_harness import enqueue

WORKER = {"ROLES": ["api", "worker"]}


async def test_retry_later_and_permanent_errors_are_logged_with_their_reason(
    serving: Any, auth_headers: dict[str, str]
) -> None:
    captured = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, captured])
    try:
        app = await serving(**WORKER)
        client = app.test_client()
        await client.put(
            "/api/queues/quick", json={"min_backoff_s": 0.05, "max_backoff_s": 0.1}, headers=auth_headers
        )
        later = await enqueue(client, auth_headers, kind="test.flaky", queue="quick",
                              payload={"fail_times": 1, "retry_after_s": 0.1})  # fmt: skip
        never = await enqueue(
            client, auth_headers, kind="test.flaky", payload={"fail_times": 1, "permanent": True}
        )
        for task in (later, never):
            await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)
    finally:
        structlog.reset_defaults()
    retried = next(e for e in captured.entries if e["event"] == "task will be retried")
    assert retried["task_id"] == later["id"]
    assert retried["reason"] == "busy on attempt 1"
    failed = next(e for e in captured.entries if e["event"] == "task failed permanently")
    assert failed["task_id"] == never["id"]
    assert failed["reason"] == "permanent failure on attempt 1"


async def test_the_console_task_page_shows_each_failed_attempts_traceback(
    serving: Any, auth_headers: dict[str, str], operator: NewOperator
) -> None:
    app = await serving(**WORKER)
    client = app.test_client()
    task = await enqueue(client, auth_headers, kind="test.flaky", payload={"fail_times": 5}, max_attempts=1)
    await client.get(f"/api/tasks/{task['id']}?wait=10", headers=auth_headers)
    browser = Browser(app)
    await log_in(browser, operator)
    page = await (await browser.get(f"/ui/tasks/{task['id']}")).get_data(as_text=True)
    assert 'data-field="traceback"' in page
    assert "Traceback (most recent call last):" in page
    assert "RuntimeError: boom on attempt 1" in page
