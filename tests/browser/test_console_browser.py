"""The console in headless Chromium against the real HTTPS server: log in with TOTP, follow a dead
letter through retry to completion live, pause and resume a queue, create and revoke a key, be
refused without a session or CSRF token, and read /docs with no network beyond the server.

Screenshots of the overview and a task page are written to docs/ for the README.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from app.database import Database
from app.src.api.auth import operators
from app.src.api.models.auth import NewOperator
from tests.browser.conftest import ServerProcess
from tests.conftest import ROOT, bearer, make_client
from tests.integration.auth.login_steps import code
from tests.task_harness import eventually, fetch

PASSWORD = "an operator password in a browser"
DOCS = ROOT / "docs"
pytestmark = pytest.mark.timeout(300)


async def new_page(chromium: Any, server: ServerProcess, *, dark: bool = False) -> tuple[Any, list[str]]:
    context = await chromium.new_context(
        base_url=server.base_url,
        ignore_https_errors=True,  # the server's own self-signed certificate
        viewport={"width": 1360, "height": 860},
        color_scheme="dark" if dark else "light",
    )
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return page, problems


async def log_in(page: Any, operator: NewOperator) -> None:
    from playwright.async_api import expect

    await page.goto("/ui/")
    await expect(page).to_have_url(re.compile(r".*/ui/login.*"))
    await page.get_by_label("Email").fill(operator.email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Continue").click()
    await page.get_by_label("Code from your authenticator app").fill(code(operator.totp_secret))
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Queues")).to_be_visible()


async def _status_of(https: aiohttp.ClientSession, headers: dict[str, str], task_id: str) -> str:
    async with https.get(f"/api/tasks/{task_id}", headers=headers) as response:
        return str((await response.json())["status"])


async def _seed_history(https: aiohttp.ClientSession, headers: dict[str, str], database_uri: str) -> None:
    """Completed tasks in two queues, their finish times spread over the last hour (for the chart)."""
    for queue, n in (("emails", 90), ("reports", 40)):
        body = {"tasks": [{"kind": "noop", "queue": queue} for _ in range(n)]}
        async with https.post("/api/tasks/batch", json=body, headers=headers) as response:
            assert response.status == 201, await response.text()

    async def all_done() -> bool:
        rows = await fetch(database_uri, "SELECT count(*) AS n FROM tasks WHERE status <> 'completed'")
        return rows[0]["n"] == 0

    await eventually(all_done, timeout=60)
    await fetch(
        database_uri,
        """
        UPDATE tasks SET finished_at = now() - make_interval(secs => 3540 * power(random(), 0.7)),
                         run_at = now() - interval '2 hours'
        WHERE status = 'completed'
        """,
    )
    await fetch(
        database_uri,
        "UPDATE tasks SET started_at = finished_at - make_interval(secs => random() * 0.2), "
        "run_at = finished_at - make_interval(secs => 0.2 + random() * random() * 4) "
        "WHERE status = 'completed'",
    )


async def test_dead_letter_retried_live_queue_paused_key_created_and_revoked(
    console_server: ServerProcess,
    https: aiohttp.ClientSession,
    chromium: Any,
    db: Database,
    clean_database: str,
    tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    operator = await operators.create_operator(db, email="ops@example.com", password=PASSWORD)
    billing = await make_client(db, "billing")
    headers = bearer(billing.api_key)
    await _seed_history(https, headers, clean_database)
    # a task that fails for want of a directory: discarded at once (one attempt), fine once it exists
    target = tmp_path / "reports-out" / "record.txt"
    task = {
        "kind": "test.record",
        "queue": "reports",
        "payload": {"path": str(target), "seconds": 2},
        "max_attempts": 1,
    }
    async with https.post("/api/tasks", json=task, headers=headers) as response:
        task_id = (await response.json())["id"]
    await eventually(lambda: _discarded(https, headers, task_id), timeout=30)

    page, problems = await new_page(chromium, console_server)
    await log_in(page, operator)
    await expect(page.get_by_role("link", name="emails")).to_be_visible()
    await page.screenshot(path=str(DOCS / "console-overview.png"))

    # the dead letter, with its error, in the list and on its page
    await page.get_by_role("navigation", name="Console").get_by_role("link", name="Dead letters").click()
    row = page.locator("tbody tr", has_text="test.record")
    await expect(row).to_contain_text("No such file or directory")
    await row.get_by_role("link").click()
    await expect(page.locator("pre.error-block").first).to_contain_text("No such file or directory")
    await expect(page.locator('[data-field="status"]')).to_have_text("discarded")
    # and the attempt's traceback, folded until asked for
    traceback = page.locator('[data-field="traceback"]').first
    await traceback.locator("summary").click()
    await expect(traceback.locator("pre")).to_contain_text("Traceback (most recent call last)")
    await expect(traceback.locator("pre")).to_contain_text("FileNotFoundError")

    # retry it and watch it complete: the status changes on this page, pushed over SSE
    target.parent.mkdir()
    await page.get_by_role("button", name="Retry").click()
    await expect(page.locator('[data-field="live"]')).to_contain_text("Live:", timeout=10_000)
    await expect(page.locator('[data-field="status"]')).to_have_text("completed", timeout=20_000)
    await expect(page.get_by_role("heading", name="Result")).to_be_visible()
    await expect(
        page.locator("section.card", has=page.get_by_role("heading", name="Result")).locator("pre")
    ).to_contain_text('"ok": true')
    assert await _status_of(https, headers, task_id) == "completed"
    assert target.exists()
    await page.screenshot(path=str(DOCS / "console-task.png"), full_page=True)

    # pause and resume its queue
    await page.locator("dd a", has_text="reports").click()
    await page.get_by_role("button", name="Pause").click()
    await expect(page.get_by_role("heading", name="Queue reports")).to_contain_text("paused")
    assert await _queue_paused(https, headers, "reports") is True
    await page.get_by_role("button", name="Resume").click()
    await expect(page.get_by_role("button", name="Pause")).to_be_visible()
    assert await _queue_paused(https, headers, "reports") is False

    # create a key (shown once), use it, revoke it
    await page.get_by_role("navigation", name="Console").get_by_role("link", name="Clients").click()
    await page.get_by_role("link", name="billing").click()
    await page.get_by_role("button", name="Create key").click()
    new_key = (await page.locator('[data-field="new-key"]').inner_text()).strip()
    assert new_key.startswith("tg_")
    async with https.get("/api/auth/me", headers=bearer(new_key)) as response:
        assert response.status == 200
    await page.reload()  # a reload re-posts nothing and shows no key
    await page.goto(f"/ui/clients/{billing.client_id}")
    await expect(page.locator('[data-field="new-key"]')).to_have_count(0)
    prefix = new_key.split("_")[1]
    await page.locator("tr", has_text=f"tg_{prefix}_").get_by_role("button", name="Revoke").click()
    await expect(page.locator("tr", has_text=f"tg_{prefix}_")).not_to_contain_text("—Revoke")
    async with https.get("/api/auth/me", headers=bearer(new_key)) as response:
        assert response.status == 401
    async with https.get("/api/auth/me", headers=headers) as response:
        assert response.status == 200  # the client's first key still works

    dark, dark_problems = await new_page(chromium, console_server, dark=True)
    await dark.context.add_cookies(await page.context.cookies())
    await dark.goto("/ui/")
    await dark.screenshot(path=str(DOCS / "console-overview-dark.png"))
    assert problems == [], problems  # no CSP violation, no script error
    assert dark_problems == [], dark_problems


async def _discarded(https: aiohttp.ClientSession, headers: dict[str, str], task_id: str) -> bool:
    return await _status_of(https, headers, task_id) == "discarded"


async def _queue_paused(https: aiohttp.ClientSession, headers: dict[str, str], name: str) -> bool:
    async with https.get(f"/api/queues/{name}", headers=headers) as response:
        return bool((await response.json())["paused"])


async def test_refused_without_a_session_and_without_a_csrf_token(
    console_server: ServerProcess,
    https: aiohttp.ClientSession,
    chromium: Any,
    db: Database,
    clean_database: str,
) -> None:
    from playwright.async_api import expect

    key = await make_client(db, "tenant")
    async with https.post("/api/tasks", json={"kind": "noop", "queue": "q1"}, headers=bearer(key.api_key)):
        pass
    [row] = await fetch(clean_database, "SELECT id FROM queues WHERE name = 'q1'")
    queue_id = row["id"]

    page, _ = await new_page(chromium, console_server)
    await page.goto(f"/ui/queues/{queue_id}")
    await expect(page).to_have_url(re.compile(r".*/ui/login\?next=.*"))
    response = await page.request.post(f"/ui/queues/{queue_id}/pause", form={"x": "1"}, max_redirects=0)
    assert response.status == 401

    operator = await operators.create_operator(db, email="csrf@example.com", password=PASSWORD)
    await log_in(page, operator)
    # the session cookie alone is not enough: a forged request has no token
    response = await page.request.post(f"/ui/queues/{queue_id}/pause", form={"x": "1"}, max_redirects=0)
    assert response.status == 403
    # nor is the page's own form once its token is taken out
    await page.goto(f"/ui/queues/{queue_id}")
    form = page.locator("form", has=page.get_by_role("button", name="Pause"))
    await form.locator('input[name="csrf_token"]').evaluate("input => input.remove()")
    await page.get_by_role("button", name="Pause").click()
    await expect(page.get_by_role("alert")).to_contain_text("CSRF")
    assert await _queue_paused(https, bearer(key.api_key), "q1") is False
    # with it, the same form works
    await page.goto(f"/ui/queues/{queue_id}")
    await page.get_by_role("button", name="Pause").click()
    await expect(page.get_by_role("heading", name="Queue q1")).to_contain_text("paused")


async def test_docs_render_offline(
    console_server: ServerProcess, https: aiohttp.ClientSession, chromium: Any
) -> None:
    from playwright.async_api import expect

    page, problems = await new_page(chromium, console_server)
    elsewhere: list[str] = []
    server_host = urlsplit(console_server.base_url).hostname

    async def only_the_server(route: Any) -> None:
        if urlsplit(route.request.url).hostname in (server_host, "127.0.0.1"):
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort()

    await page.context.route("**/*", only_the_server)
    await page.goto("/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Taskgate", timeout=20_000)
    await expect(page.locator(".opblock", has_text="/api/tasks").first).to_be_visible()
    await asyncio.sleep(0.5)
    assert elsewhere == []
    assert problems == [], problems
