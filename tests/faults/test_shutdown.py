"""(4) SIGTERM under load while clients follow tasks (long-polls and server-sent events)."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import aiohttp
import pytest

from tests.faults.common import prepare, running
from tests.faults.load import Answers, enqueue_load, http_task, query, timed
from tests.faults.procs import Deployment
from tests.faults.report import Promises
from tests.faults.sink import Sink

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

GRACE_S = 3.0
FOLLOWERS = 5


@dataclass
class Follow:
    kind: str
    ended: str = "running"  # clean | unclean: <why> | still open
    answers: int = 0
    last_status: int | None = None


async def long_poll(
    http: aiohttp.ClientSession, headers: dict[str, str], task_id: str, follow: Follow
) -> None:
    """GET ?wait=10 again and again: each answer must be a whole HTTP answer, never a 500."""
    while True:
        try:
            async with http.get(f"/api/tasks/{task_id}?wait=10", headers=headers) as response:
                await response.read()
                follow.answers += 1
                follow.last_status = response.status
                if response.status >= 500 and response.status != 503:
                    follow.ended = f"unclean: {response.status}"
                    return
                if response.status == 503:
                    follow.ended = (
                        "clean" if response.headers.get("Retry-After") else "unclean: 503 no Retry-After"
                    )
                    return
        except aiohttp.ClientConnectorError:
            follow.ended = (
                "clean: refused"  # the listener is closed: a new request is refused, nothing was cut
            )
            return
        except (aiohttp.ClientError, OSError) as exc:
            follow.ended = f"unclean: {type(exc).__name__}: {exc}"
            return


async def stream(http: aiohttp.ClientSession, headers: dict[str, str], task_id: str, follow: Follow) -> None:
    """Read the SSE stream to its end: a clean end of stream after whole events, or a cut."""
    try:
        async with http.get(f"/api/tasks/{task_id}/events", headers=headers) as response:
            follow.last_status = response.status
            if response.status != 200:
                follow.ended = "clean: 503" if response.status == 503 else f"unclean: {response.status}"
                return
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                follow.answers += chunk.count(b"\n\n")
            tail = buffer.replace(b"\r\n", b"\n")
            follow.ended = (
                "clean" if not tail or tail.endswith(b"\n\n") else "unclean: stream ended mid-event"
            )
    except (aiohttp.ClientError, OSError) as exc:
        follow.ended = f"unclean: {type(exc).__name__}: {exc}"


async def test_sigterm_under_load_with_followers(deployment: Deployment, sink: Sink) -> None:
    promises = Promises("4 SIGTERM")
    server = deployment.server("serve", WORKER_SHUTDOWN_GRACE_S=str(GRACE_S))
    await deployment.ready(server)
    headers = await prepare(deployment, server)
    answers = Answers()
    follows: list[Follow] = []
    async with deployment.session(server) as http, deployment.session(server) as followers:
        # tasks that outlive the grace period: they must be released, not left running
        long_ids = []
        for _ in range(FOLLOWERS * 2):
            answer, body = await timed(
                http, "POST", "/api/tasks", json=http_task(sink.url(60), timeout_s=120), headers=headers
            )
            assert answer.status == 201, answer
            long_ids.append(str(body["id"]))
        follower_tasks = []
        for i in range(FOLLOWERS):
            poll, events = Follow("long-poll"), Follow("sse")
            follows += [poll, events]
            follower_tasks.append(asyncio.create_task(long_poll(followers, headers, long_ids[i], poll)))
            follower_tasks.append(
                asyncio.create_task(stream(followers, headers, long_ids[FOLLOWERS + i], events))
            )
        async with running(
            lambda stop: enqueue_load(
                http, headers, answers, stop, lambda: http_task(sink.url(0.3)), clients=4
            )
        ):
            await asyncio.sleep(4)
            signalled_at = server.signal(signal.SIGTERM)
            code = await server.wait_exit(GRACE_S + 20)
            exited_at = time.time() if code is not None else None
        _, pending = await asyncio.wait(follower_tasks, timeout=10)
        for task in pending:
            task.cancel()
        for follow, task in zip(follows, follower_tasks, strict=True):
            if task in pending:
                follow.ended = "still open 10 s after exit"

    shutdown_s = round(exited_at - signalled_at, 2) if exited_at else None
    claimed_after = await query(
        deployment.db_uri,
        "SELECT count(*) AS n FROM ("
        " SELECT id FROM tasks WHERE started_at > to_timestamp($1)"
        " UNION SELECT task_id FROM task_attempts WHERE started_at > to_timestamp($1)) AS claimed",
        signalled_at,
    )
    left_running = await query(deployment.db_uri, "SELECT count(*) AS n FROM tasks WHERE status = 'running'")
    deliveries_after = sum(1 for ds in sink.deliveries.values() for d in ds if d.start > signalled_at + 0.05)
    refused = [
        a for a in answers.items if a.start >= signalled_at and "ClientConnectorError" in (a.error or "")
    ]
    figures = answers.figures([a for a in answers.items if a not in refused])
    unclean = [f"{f.kind}: {f.ended}" for f in follows if not f.ended.startswith("clean")]
    promises.record(
        **figures,
        exit_code=code,
        shutdown_s=shutdown_s,
        grace_s=GRACE_S,
        claimed_after_signal=claimed_after[0]["n"],
        deliveries_started_after_signal=deliveries_after,
        left_running=left_running[0]["n"],
        followers={f"{f.kind}#{i}": f.ended for i, f in enumerate(follows)},
        unclean_followers=len(unclean),
        refused_after_signal=len(refused),
    )
    promises.check(code == 0, f"exit code {code} (0 expected)")
    promises.check(
        shutdown_s is not None and shutdown_s <= GRACE_S + 1,
        f"exit took {shutdown_s} s after SIGTERM (grace {GRACE_S} s + 1 s allowed)",
    )
    promises.check(claimed_after[0]["n"] == 0, f"{claimed_after[0]['n']} tasks claimed after the signal")
    promises.check(figures["500s"] == 0, f"{figures['500s']} answers were 5xx other than 503")
    promises.check(not unclean, f"followers did not end cleanly: {unclean}")
    promises.check(left_running[0]["n"] == 0, f"{left_running[0]['n']} tasks left 'running' after the exit")
    promises.verify()
