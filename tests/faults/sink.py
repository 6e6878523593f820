"""The sink: a real HTTP server that `http` tasks call; it records every delivery.

Each request is one delivery of one task (the task id is the Standard Webhooks `webhook-id`
header). The sink records when it started and when it ended (answered, or the caller went away)
and can hold a request (`?hold=S`) so that a second execution of the same task can overlap the
first one. Overlapping deliveries of one task are the proof that two workers ran it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Delivery:
    task_id: str
    start: float
    end: float | None = None
    answered: bool = False


@dataclass
class Sink:
    port: int = 0
    deliveries: dict[str, list[Delivery]] = field(default_factory=lambda: defaultdict(list))
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/hit", self._hit)
        # handler_cancellation: a caller that goes away (killed, fenced) ends its delivery now
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def url(self, hold_s: float = 0.0) -> str:
        return f"http://127.0.0.1:{self.port}/hit?hold={hold_s}"

    async def _hit(self, request: web.Request) -> web.Response:
        task_id = request.headers.get("webhook-id", "unknown")
        delivery = Delivery(task_id, time.time())
        self.deliveries[task_id].append(delivery)
        try:
            await request.read()
            hold = float(request.query.get("hold", "0"))
            if hold:
                await asyncio.sleep(hold)
            delivery.answered = True
            return web.json_response({"ok": True})
        finally:
            delivery.end = time.time()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # figures

    def in_flight(self, at: float | None = None) -> int:
        at = time.time() if at is None else at
        return sum(
            1
            for ds in self.deliveries.values()
            for d in ds
            if d.start <= at and (d.end is None or d.end > at)
        )

    def delivered(self, task_id: str) -> bool:
        return any(d.answered for d in self.deliveries.get(task_id, ()))

    def duplicates(self) -> int:
        """Deliveries beyond the first, over all tasks (at-least-once allows them; count them)."""
        return sum(len(ds) - 1 for ds in self.deliveries.values() if len(ds) > 1)

    def overlapping_tasks(self) -> list[str]:
        """Tasks that had two deliveries open at the same time."""
        now = time.time()
        found = []
        for task_id, ds in self.deliveries.items():
            spans = sorted((d.start, d.end if d.end is not None else now) for d in ds)
            latest_end = None
            for start, end in spans:
                if latest_end is not None and start < latest_end:
                    found.append(task_id)
                    break
                latest_end = end if latest_end is None else max(latest_end, end)
        return found

    def first_start_after(self, moment: float) -> float | None:
        starts = [d.start for ds in self.deliveries.values() for d in ds if d.start >= moment]
        return min(starts) if starts else None

    def redelivery_gaps(self) -> list[float]:
        """Per duplicated task: seconds from the end of one delivery to the start of the next
        (negative: they overlapped)."""
        now = time.time()
        gaps = []
        for ds in self.deliveries.values():
            spans = sorted((d.start, d.end if d.end is not None else now) for d in ds)
            gaps += [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        return gaps

    def spans_summary(self) -> dict[str, object]:
        gaps = self.redelivery_gaps()
        durations = [
            (d.end or time.time()) - d.start for ds in self.deliveries.values() for d in ds if len(ds) > 1
        ]
        return {
            "tasks_delivered": len(self.deliveries),
            "deliveries": sum(len(ds) for ds in self.deliveries.values()),
            "min_redelivery_gap_s": round(min(gaps), 3) if gaps else None,
            "max_duplicated_delivery_s": round(max(durations), 3) if durations else None,
        }
