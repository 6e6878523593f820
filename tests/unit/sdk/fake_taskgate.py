"""The remote-worker protocol of Taskgate in memory, held to the server's own request models and
body cap, so a Worker can be run against it in milliseconds (leases are tracked, not enforced)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import ValidationError

from app.src.api.models.workers import ClaimIn, CompleteIn, HeartbeatIn

MAX_BODY = 8 * 1024 * 1024  # the server's MAX_CONTENT_LENGTH


def problem(status: int, detail: str) -> httpx.Response:
    return httpx.Response(status, json={"type": "about:blank", "title": "refused", "status": status,
                                        "detail": detail})  # fmt: skip


class FakeTaskgate:
    def __init__(self, *, lease_s: float = 30.0) -> None:
        self.lease_s = lease_s
        self.available: list[dict[str, Any]] = []
        self.completed: dict[str, dict[str, Any]] = {}  # task id -> the accepted completion item
        self.expires: dict[str, float] = {}  # task id -> monotonic time its lease ends here
        self.lost: set[str] = set()
        self.refused: list[tuple[str, int]] = []  # (path, status) of every request refused
        self.heartbeats: list[dict[str, Any]] = []  # accepted heartbeat bodies
        self.refuse_item: Callable[[dict[str, Any]], bool] = lambda _item: False
        self.break_item: Callable[[dict[str, Any]], bool] = lambda _item: False  # answered 500
        self.hang_heartbeats = False
        self.break_heartbeats = 0  # how many heartbeats to answer 500 (and not apply)
        self.stopping = False  # a server shutting down: claims end at once, with Retry-After: 1
        self.claims = 0

    def add(self, kind: str, payload: dict[str, Any] | None = None, *, task_id: str | None = None,
            attempt: int = 1) -> str:  # fmt: skip
        task_id = task_id or str(uuid.uuid4())
        self.available.append({"id": task_id, "kind": kind, "queue": "default", "payload": payload or {},
                               "attempt": attempt, "max_attempts": 25})  # fmt: skip
        return task_id

    def client(self) -> Any:
        import taskgate

        http = httpx.AsyncClient(base_url="https://tg.test", transport=httpx.MockTransport(self.handle))
        return taskgate.AsyncClient("https://tg.test", api_key="k", http=http, max_retries=0)

    @contextlib.asynccontextmanager
    async def serving(self, worker: Any) -> AsyncIterator[None]:
        """`worker` running against this server for the block's length, then stopped."""
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run_async(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(run, 15)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if len(request.content) > MAX_BODY:
            return self._refuse(path, problem(413, "request body too large"))
        body = json.loads(request.content) if request.content else {}
        if path.startswith("/api/catalog/kinds/"):
            return httpx.Response(200, json={"name": path.rsplit("/", 1)[1], **body})
        answer = {
            "/api/workers/claim": (ClaimIn, self._claim),
            "/api/workers/heartbeat": (HeartbeatIn, self._heartbeat),
            "/api/workers/complete": (CompleteIn, self._complete),
        }.get(path)
        if answer is None:
            return httpx.Response(404)
        model, serve = answer
        try:
            model.model_validate(body)
        except ValidationError as exc:
            return self._refuse(path, problem(422, str(exc)))
        return await serve(body)

    def _refuse(self, path: str, response: httpx.Response) -> httpx.Response:
        self.refused.append((path, response.status_code))
        return response

    async def _claim(self, body: dict[str, Any]) -> httpx.Response:
        self.claims += 1
        if self.stopping:
            empty = {"lease_s": self.lease_s, "items": []}
            return httpx.Response(200, headers={"Retry-After": "1"}, json=empty)
        if not self.available:
            await asyncio.sleep(0.02)  # a short long-poll
        items, self.available = self.available[: body["max"]], self.available[body["max"] :]
        expires = datetime.now(UTC) + timedelta(seconds=self.lease_s)
        for item in items:
            self.expires[item["id"]] = time.monotonic() + self.lease_s
        claimed = [{**item, "lease_expires_at": expires.isoformat()} for item in items]
        return httpx.Response(200, json={"lease_s": self.lease_s, "items": claimed})

    async def _heartbeat(self, body: dict[str, Any]) -> httpx.Response:
        if self.hang_heartbeats:
            await asyncio.Event().wait()
        if self.break_heartbeats > 0:
            self.break_heartbeats -= 1
            return self._refuse("/api/workers/heartbeat", problem(500, "internal server error"))
        self.heartbeats.append(body)
        expires = datetime.now(UTC) + timedelta(seconds=self.lease_s)
        held = [i for i in body["task_ids"] if i not in self.lost]
        for task_id in held:
            self.expires[task_id] = time.monotonic() + self.lease_s
        items = [{"id": i, "lease_expires_at": expires.isoformat(), "cancel_requested": False} for i in held]
        return httpx.Response(
            200, json={"items": items, "lost": [i for i in body["task_ids"] if i in self.lost]}
        )

    async def _complete(self, body: dict[str, Any]) -> httpx.Response:
        if any(self.break_item(item) for item in body["items"]):
            return self._refuse("/api/workers/complete", problem(500, "internal server error"))
        bad = [item for item in body["items"] if self.refuse_item(item)]
        if bad:
            return self._refuse("/api/workers/complete", problem(422, f"item {bad[0]['id']} refused"))
        for item in body["items"]:
            self.completed[item["id"]] = item
        answers = [{"id": i["id"], "accepted": True, "status": i["outcome"]} for i in body["items"]]
        return httpx.Response(200, json={"items": answers})


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Until `condition()` holds; TimeoutError after `timeout_s` (what a test fails with)."""

    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout_s)
