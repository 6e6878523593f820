"""A remote worker for a typed kind: `python -m taskgate worker reports_worker:worker`.

Environment: TASKGATE_URL (https://localhost:8080), TASKGATE_API_KEY, TASKGATE_CA (a CA bundle
path; unset means the system's).
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from taskgate import Client, PermanentError, RetryLater, TaskCancelled, TaskContext, Worker

tg = Client(
    os.environ.get("TASKGATE_URL", "https://localhost:8080"),
    api_key=os.environ["TASKGATE_API_KEY"],
    verify=os.environ.get("TASKGATE_CA", True),
)
worker = Worker(tg, queues=["reports"], concurrency=20, version="reports-1.0")


class BuildReport(BaseModel):
    account_id: int
    pages: int = 3


class ReportReady(BaseModel):
    url: str


@worker.kind("reports.build", payload=BuildReport, result=ReportReady, max_attempts=5)
async def build_report(ctx: TaskContext, payload: BuildReport) -> ReportReady:
    """Render a report, page by page, reporting progress."""
    if payload.account_id <= 0:
        raise PermanentError("no such account")  # dead letter at once: retrying cannot help
    for page in range(payload.pages):
        if ctx.cancelled:
            raise TaskCancelled("stopped on request")
        ctx.progress({"page": page + 1, "of": payload.pages})
        await asyncio.sleep(0.1)
    return ReportReady(url=f"https://reports.example/{payload.account_id}.pdf")


class Thumbnail(BaseModel):
    image_url: str


@worker.kind("images.thumbnail", payload=Thumbnail)
def thumbnail(ctx: TaskContext, payload: Thumbnail) -> dict[str, str]:
    """A blocking handler: it runs in the worker's thread pool."""
    if payload.image_url.startswith("http://"):
        raise RetryLater("the image host is warming up", after_s=30)
    return {"thumbnail_url": payload.image_url + "?w=128"}


if __name__ == "__main__":
    tg.enqueue("reports.build", {"account_id": 7}, queue="reports")
    worker.run()
