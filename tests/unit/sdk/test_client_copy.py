"""The AsyncClient a Worker makes from a blocking Client: it talks to the server as that Client does."""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate

TASK = {
    "id": "01a20047-8222-700d-bc3e-3051b847dd5e", "queue": "default", "kind": "noop", "payload": {},
    "status": "available", "priority": 5, "attempts": 0, "max_attempts": 25,
    "run_at": "2026-12-01T00:00:00Z", "created_at": "2026-12-01T00:00:00Z",
}  # fmt: skip


async def test_the_async_copy_of_a_client_sends_its_extra_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TASK)

    real = httpx.AsyncClient

    def served_here(**options: Any) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(answer), **options)

    monkeypatch.setattr(httpx, "AsyncClient", served_here)
    with taskgate.Client("https://tg.test", api_key="k", headers={"X-Tenant": "acme"}) as sync:
        async with taskgate.AsyncClient.like(sync) as copy:
            await copy.get(TASK["id"])
    assert seen[0].headers["X-Tenant"] == "acme"
    assert seen[0].headers["Authorization"] == "Bearer k"


def test_a_client_on_its_own_http_client_is_not_silently_copied() -> None:
    sync = taskgate.Client("https://tg.test", http=httpx.Client(base_url="https://tg.test"))
    with sync, pytest.raises(ValueError, match="AsyncClient"):
        taskgate.AsyncClient.like(sync)
