"""The SDK's whole-list calls follow `next_cursor` to the last page (the server pages every list)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

AT = "2026-12-01T00:00:00Z"
QUEUE = {"max_attempts": 25, "min_backoff_s": 1, "max_backoff_s": 3600, "paused": False, "created_at": AT,
         "updated_at": AT}  # fmt: skip
SCHEDULE = {"name": "s", "cron": "* * * * *", "timezone": "UTC", "task": {}, "paused": False,
            "created_at": AT, "updated_at": AT}  # fmt: skip
ATTEMPT = {"started_at": AT, "finished_at": AT, "outcome": "failed", "duration_ms": 1.0}


def pages(*bodies: dict[str, Any]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """Answers each GET with the next body; a page that is not the last names the next cursor."""
    seen: list[httpx.Request] = []
    left = list(bodies)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=left.pop(0))

    return httpx.MockTransport(handle), seen


def test_queues_schedules_and_kinds_are_read_whole_page_after_page() -> None:
    transport, seen = pages(
        {"items": [{**QUEUE, "name": "a"}], "next_cursor": "c1"},
        {"items": [{**QUEUE, "name": "b"}]},  # the last page leaves next_cursor out
        {"items": [{**SCHEDULE, "id": "01a20047-8222-700d-bc3e-3051b847dd5e"}], "next_cursor": "s1"},
        {"items": [{**SCHEDULE, "id": "01a20047-8222-700d-bc3e-3051b847dd5f"}], "next_cursor": None},
        {"items": [{"name": "noop", "payload_schema": {}}], "next_cursor": "k1"},
        {"items": [{"name": "zz.remote", "payload_schema": {}, "remote": True}], "next_cursor": None},
    )
    tg = taskgate.Client("https://tg.test", api_key="k", http=httpx.Client(base_url="https://tg.test",
                                                                          transport=transport))  # fmt: skip
    assert [q.name for q in tg.queues()] == ["a", "b"]
    assert len(tg.schedules()) == 2  # the server's pages of 50 were read as the whole list
    assert [k.name for k in tg.kinds()] == ["noop", "zz.remote"]
    assert [r.url.params.get("cursor") for r in seen] == [None, "c1", None, "s1", None, "k1"]
    assert {r.url.params.get("limit") for r in seen} == {"500"}


def test_the_async_client_reads_attempts_whole() -> None:
    transport, seen = pages(
        {"items": [{**ATTEMPT, "attempt": 1}, {**ATTEMPT, "attempt": 2}], "next_cursor": "a2"},
        {"items": [{**ATTEMPT, "attempt": 3}]},
    )

    async def read() -> list[int]:
        http = httpx.AsyncClient(base_url="https://tg.test", transport=transport)
        async with taskgate.AsyncClient("https://tg.test", api_key="k", http=http) as tg:
            found = [a.attempt for a in await tg.attempts("01a20047-8222-700d-bc3e-3051b847dd5e")]
        await http.aclose()
        return found

    assert asyncio.run(read()) == [1, 2, 3]
    assert [r.url.params.get("cursor") for r in seen] == [None, "a2"]
