"""Server-sent events framing, shared by the API's and the console's event streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any


async def frames(events: AsyncIterable[dict[str, Any] | None]) -> AsyncIterator[bytes]:
    """Each event as an SSE message named by its `event` key (default `task`); None as a keep-alive."""
    async for event in events:
        if event is None:
            yield b": keep-alive\n\n"
        else:
            name = event.pop("event", "task")  # task, or step | signal | child | suspended
            yield f"event: {name}\ndata: {json.dumps(event)}\n\n".encode()


def shutdown_event(retry_after_s: int) -> bytes:
    """The last message of a stream that a shutting-down server ends: reconnect after this long
    (the SSE `retry` field; EventSource does it by itself), and another replica answers."""
    return (
        f'retry: {retry_after_s * 1000}\nevent: shutdown\ndata: {{"retry_after_s": {retry_after_s}}}\n\n'
    ).encode()
