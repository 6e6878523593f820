"""Load and measurement: enqueue clients that record every answer, and the completion check."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg

from tests.conftest import driver_uri

ANSWER_TIMEOUT_S = 30.0  # a request still unanswered after this is recorded as a hang (status 0)


@dataclass
class Answer:
    start: float
    end: float
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    retry_after: str | None = None
    problem_json: bool = False
    error: str | None = None
    route: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Answers:
    items: list[Answer] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.items if a.end >= start and a.start <= end]

    def figures(self, items: list[Answer] | None = None) -> dict[str, Any]:
        items = self.items if items is None else items
        by_status = Counter(a.status for a in items)
        unavailable = [a for a in items if a.status == 503]
        return {
            "answers": len(items),
            "201s": by_status.get(201, 0),
            "503s": by_status.get(503, 0),
            "503s_without_retry_after": sum(1 for a in unavailable if not a.retry_after),
            "500s": sum(n for s, n in by_status.items() if s >= 500 and s != 503),
            "no_answer": by_status.get(0, 0),
            "other": {str(s): n for s, n in by_status.items() if s not in (0, 201, 503) and s < 500},
            "max_answer_s": round(max((a.seconds for a in items), default=0.0), 3),
            "answers_over_5s": sum(1 for a in items if a.seconds > 5),
            "no_answer_errors": sorted({a.error.split(":")[0] for a in items if a.status == 0 and a.error})[
                :5
            ],
        }


def http_task(sink_url: str, queue: str = "faults", **extra: Any) -> dict[str, Any]:
    return {"queue": queue, "kind": "http", "payload": {"url": sink_url, "json": {"from": "faults"}, **extra}}


async def timed(
    http: aiohttp.ClientSession, method: str, path: str, answers: Answers | None = None, **kwargs: Any
) -> tuple[Answer, Any]:
    """One request, timed; the answer is recorded (and returned with the JSON body, if any)."""
    start = time.time()
    body: Any = None
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            async with http.request(method, path, **kwargs) as response:
                raw = await response.read()
                content_type = response.headers.get("Content-Type", "")
                answer = Answer(
                    start,
                    time.time(),
                    response.status,
                    response.headers.get("Retry-After"),
                    content_type.startswith("application/problem+json"),
                    route=path,
                )
                if "json" in content_type:
                    with contextlib.suppress(ValueError):
                        body = await response.json(content_type=None)
                elif not raw:
                    body = None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        answer = Answer(start, time.time(), 0, error=f"{type(exc).__name__}: {exc}", route=path)
    if answers is not None:
        answers.items.append(answer)
    return answer, body


async def enqueue_load(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    answers: Answers,
    stop: asyncio.Event,
    task_body: Any,
    *,
    clients: int = 4,
    pause_s: float = 0.03,
) -> None:
    """`clients` concurrent loops POSTing /api/tasks until `stop` is set; every answer recorded."""

    async def loop() -> None:
        while not stop.is_set():
            answer, body = await timed(http, "POST", "/api/tasks", answers, json=task_body(), headers=headers)
            if answer.status == 201 and isinstance(body, dict) and "id" in body:
                answers.created.append(str(body["id"]))
            if answer.status != 201:
                await asyncio.sleep(0.05)  # a client backs off a little on errors, as real ones do
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(loop() for _ in range(clients)))


async def statuses(db_uri: str, ids: list[str]) -> Counter[str]:
    conn = await asyncpg.connect(driver_uri(db_uri), timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1::uuid[]) GROUP BY 1", ids
        )
    finally:
        await conn.close()
    found = Counter({r["status"]: r["n"] for r in rows})
    missing = len(set(ids)) - sum(found.values())
    if missing:
        found["missing"] = missing
    return found


async def wait_completed(db_uri: str, ids: list[str], timeout: float) -> tuple[Counter[str], float]:
    """Wait until every task is terminal; returns the status counts and the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        counts = await statuses(db_uri, ids)
        unfinished = sum(n for s, n in counts.items() if s not in ("completed", "discarded", "cancelled"))
        if not unfinished or time.monotonic() > deadline:
            return counts, time.monotonic() - start
        await asyncio.sleep(0.5)


async def query(db_uri: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(driver_uri(db_uri), timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def poll_ready(
    http: aiohttp.ClientSession, stop: asyncio.Event, log: list[tuple[float, float, int, Any]]
) -> None:
    """GET /api/common/ready every 0.2 s: (start, end, status, body) per answer."""
    while not stop.is_set():
        start = time.time()
        status, body = 0, None
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S), http.get("/api/common/ready") as response:
                status = response.status
                with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                    body = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        log.append((start, time.time(), status, body))
        await asyncio.sleep(0.2)
