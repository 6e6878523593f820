"""Server-sent events framing, shared by the API's and the console's event streams."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# How often an open stream asks whether its caller may still read it (see `frames`)
RECHECK_ALLOWED_S = 1.0


async def frames(
    events: AsyncIterator[dict[str, Any] | None],
    *,
    allowed: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[bytes]:
    """Each event as an SSE message named by its `event` key (default `task`), with its `sse_id`
    key (if any) as the SSE `id`; None as a keep-alive.

    A stream outlives the request that authenticated it (a task may wait for days): before a
    message goes out, and at most every RECHECK_ALLOWED_S, `allowed()` is asked again, and the
    stream ends once it says no (a revoked key, a disabled client, an ended session), as the next
    request would be refused. Keep-alives come at least every 15 s, so that is the longest a
    refused caller keeps a stream open.
    """
    checked_at = time.monotonic()
    try:
        async for event in events:
            if allowed is not None and time.monotonic() - checked_at >= RECHECK_ALLOWED_S:
                if not await allowed():
                    return
                checked_at = time.monotonic()
            if event is None:
                yield b": keep-alive\n\n"
            else:
                name = event.pop("event", "task")  # task, or step | signal | child | suspended
                # the SSE id: sent back as Last-Event-ID by a reconnecting client, to resume after it
                # (last: a message still opens with its `event` line)
                cursor = event.pop("sse_id", None)
                tail = f"id: {cursor}\n" if cursor else ""
                yield f"event: {name}\ndata: {json.dumps(event)}\n{tail}\n".encode()
    finally:
        # an early end (or a client gone) leaves `events` suspended: close it now, which ends its
        # watch on the task, rather than whenever the collector finds it
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def shutdown_event(retry_after_s: int) -> bytes:
    """The last message of a stream that a shutting-down server ends: reconnect after this long
    (the SSE `retry` field; EventSource does it by itself), and another replica answers."""
    return (
        f'retry: {retry_after_s * 1000}\nevent: shutdown\ndata: {{"retry_after_s": {retry_after_s}}}\n\n'
    ).encode()


def unavailable_event(retry_after_s: int) -> bytes:
    """The last message of a stream whose database went away under it: its 200 was sent, so no
    503 can follow; reconnect after this long (the SSE `retry` field), and the new request gets
    the 503 with Retry-After while the database is still out of reach."""
    return (
        f'retry: {retry_after_s * 1000}\nevent: unavailable\ndata: {{"retry_after_s": {retry_after_s}}}\n\n'
    ).encode()
