"""Browser tests: headless Chromium (Debian's package) driven by Playwright, against the real server
over HTTPS. Run by `make test-browser` (and .ci/run); `make test` skips them to keep its budget."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.settings import Settings
from tests.e2e.conftest import ServerProcess, start_server, wait_ready

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ENABLED = os.environ.get("TASKGATE_BROWSER_TESTS") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="browser tests run with `make test-browser` (TASKGATE_BROWSER_TESTS=1)")
    for item in items:
        if item.path.parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture
def console_server(clean_database: str, settings: Settings, tmp_path: Path) -> Iterator[ServerProcess]:
    """The real server with API and worker roles, the test kinds, and the test's SECRET_KEYS."""
    process = start_server(
        clean_database,
        tmp_path / "server",
        roles="api,worker",
        env={
            "SECRET_KEYS": ",".join(settings.SECRET_KEYS),
            "TASK_KIND_MODULES": "tests.kinds",
            "WORKER_POLL_INTERVAL_S": "0.2",
        },
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def https(console_server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=console_server.ssl_context())
    async with aiohttp.ClientSession(base_url=console_server.base_url, connector=connector) as session:
        await wait_ready(session)
        yield session


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()
