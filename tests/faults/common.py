"""What every scenario does first: an API key, the `faults` queue with quick retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.faults.procs import Deployment, Proc, create_api_key

QUEUE = "faults"


async def prepare(deployment: Deployment, proc: Proc, name: str = "faults") -> dict[str, str]:
    """A full-scope API key and the `faults` queue (retries after 0.1-1 s); returns auth headers."""
    key = await asyncio.to_thread(create_api_key, deployment, name)
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        deployment.session(proc) as http,
        http.put(
            f"/api/queues/{QUEUE}", json={"min_backoff_s": 0.1, "max_backoff_s": 1.0}, headers=headers
        ) as answer,
    ):
        assert answer.status in (200, 201), await answer.text()
    return headers


@contextlib.asynccontextmanager
async def running(*jobs: Callable[[asyncio.Event], Awaitable[Any]]) -> Any:
    """Run background loops that watch one stop event; stop and await them on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(job(stop)) for job in jobs]
    try:
        yield stop
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=40)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def session_factory(deployment: Deployment, proc: Proc) -> aiohttp.ClientSession:
    return deployment.session(proc)
