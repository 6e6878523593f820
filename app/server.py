"""The HTTP server: uvicorn's httptools protocol with the limits it lacks, and a shutdown in one grace.

httptools has no header size limit and uvicorn no header timeout: a client could send a 64 MiB
header (all buffered) or trickle one byte at a time and hold a connection for ever. This protocol
counts the bytes of a request head as they arrive and refuses it (431) beyond
SERVER_MAX_HEADER_BYTES, cuts a head that is not complete SERVER_HEADER_TIMEOUT_S after it began
(408), cuts a body that is not complete SERVER_BODY_TIMEOUT_S after its head (408, or a plain close
once answered: uvicorn reads the rest of a body it answered for as long as bytes keep coming, each
putting off the keep-alive timeout, so a body trickled at a byte a second held a connection for
ever, with or without a key), answers 503 with Retry-After beyond SERVER_MAX_CONNECTIONS, and
aborts a TLS connection that does not answer our close_notify promptly (asyncio would keep it for
30 s, and uvicorn's drain waits for every connection).
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from asyncio import TimerHandle
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType
from typing import Any

import httptools
import structlog
import uvicorn
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import MAX_REQUEST_BODY_BYTES

log = structlog.get_logger("taskgate.server")

# how long a closed TLS connection may wait for the peer's close_notify before it is aborted
CLOSE_LINGER_S = 0.5
# the least time uvicorn's drain gets, so answers that are being written are not cut into 500s
MIN_DRAIN_S = 0.25


# A request body larger than LARGE_BODY_BYTES (by its Content-Length) is admitted only while the
# process's large bodies in flight, request to response, stay within LARGE_BODIES_BYTES; beyond,
# its head is answered 503 + Retry-After before a byte of it is read. Parsed, a JSON body of many
# small values takes some 30 times its size (an 8 MiB one of empty objects ~270 MB): without this,
# only SERVER_MAX_CONNECTIONS bounded how many of those one process held at once.
LARGE_BODY_BYTES = 1024 * 1024
LARGE_BODIES_BYTES = 32 * 1024 * 1024


class LargeBodies:
    """The bytes of large request bodies a process holds (its event loop runs the protocol
    callbacks one at a time: no lock)."""

    def __init__(self, total: int = LARGE_BODIES_BYTES) -> None:
        self.left = total


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was answered and closed."""


def _problem(status: int, detail: str, *, retry_after: int | None = None) -> bytes:
    phrase = HTTPStatus(status).phrase
    body = json.dumps({"type": "about:blank", "title": phrase, "status": status, "detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "content-type: application/problem+json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. The limits are class attributes: `guarded_protocol` makes a configured class."""

    max_header_bytes = 65_536
    header_timeout_s = 10.0
    body_timeout_s = 60.0
    max_connections: int | None = None
    large_bodies = LargeBodies()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # enforced below, with a problem body and Retry-After
        self._reading_head = True
        self._head_bytes = 0  # bytes received since the current request head began
        self._parsed_head_bytes = 0
        self._head_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._abort_timer: TimerHandle | None = None
        self._refused = False
        self._large: collections.deque[int] = collections.deque()  # per request, in response order

    # --- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a connection that never sends a complete head is cut as well, not only a slow one
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        while self._large:
            self.large_bodies.left += self._large.popleft()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what the client still sends is dropped
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._reading_head and self._head_bytes > self.max_header_bytes:
            self._refuse(431, f"The request head exceeds {self.max_header_bytes} bytes.")

    # --- request head ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._parsed_head_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._parsed_head_bytes > self.max_header_bytes:
            self._refuse(431, f"The request head exceeds {self.max_header_bytes} bytes.")
            raise _Refused
        limit = self.max_connections
        if limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit.")
            self._refuse(503, "The server is at its connection limit; retry shortly.", retry_after=1)
            raise _Refused
        length = self._content_length()
        # (one past what the application takes is refused by it, 413, without reading it)
        if LARGE_BODY_BYTES < length <= MAX_REQUEST_BODY_BYTES:
            if self.large_bodies.left < length:
                self.logger.warning("Exceeded the large request bodies' budget.")
                self._refuse(
                    503, "The server holds as many large request bodies as it takes; retry shortly.",
                    retry_after=1,
                )  # fmt: skip
                raise _Refused
            self.large_bodies.left -= length
            self._large.append(length)
        super().on_headers_complete()
        # the body (if any) must follow within its own time: cancelled when the message completes
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        # what follows on this connection is the next request's head
        self._reading_head = True
        self._head_bytes = 0

    # --- closing ---------------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        if self._large:
            self.large_bodies.left += self._large.popleft()
        if self.transport.is_closing():
            self._abort_later()
        super().on_response_complete()

    def timeout_keep_alive_handler(self) -> None:
        self._close()

    def send_400_response(self, msg: str) -> None:
        # a problem body like every other error (uvicorn's own is text/plain)
        self._refuse(400, msg)

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_started:
            # a request still sending its body would hold the drain until the body timeout; the
            # application sees a disconnect and the client a 503 it can retry elsewhere
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(503, "The server is shutting down; retry shortly.", retry_after=1)
            return
        super().shutdown()
        if self.transport.is_closing():
            self._abort_later()

    def _content_length(self) -> int:
        for name, value in self.headers:
            if name == b"content-length":
                return int(value) if value.isdigit() else 0  # not a length: the parser refuses it
        return 0

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self._close()  # nothing was asked: a plain close, as for an idle keep-alive connection
            return
        self._refuse(408, f"The request head was not complete within {self.header_timeout_s:g} s.")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # the application, still waiting for the body, sees a disconnect; the client a 408
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(408, f"The request body was not complete within {self.body_timeout_s:g} s.")
            return
        self._close()  # answered (or answering) already: what is left of the body is not waited for

    def _refuse(self, status: int, detail: str, *, retry_after: int | None = None) -> None:
        """Answer with a problem and close, whatever the parser is in the middle of."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self.transport.write(_problem(status, detail, retry_after=retry_after))
        self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
        self._abort_later()

    def _abort_later(self) -> None:
        if self._abort_timer is None:
            self._abort_timer = self.loop.call_later(CLOSE_LINGER_S, self._abort)

    def _abort(self) -> None:
        # still here: the peer never answered our TLS close_notify; stop waiting for it
        self._abort_timer = None
        if self in self.connections:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._abort_timer = None


def guarded_protocol(
    *,
    max_header_bytes: int,
    header_timeout_s: float,
    body_timeout_s: float,
    max_connections: int | None,
) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits (uvicorn builds one instance per connection)."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_header_bytes": max_header_bytes,
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
            "large_bodies": LargeBodies(),
        },
    )


class Server(uvicorn.Server):
    """uvicorn's Server with Taskgate's stop sequence.

    On the first SIGTERM/SIGINT, `on_stop` runs at once (stop claiming, end long-polls and event
    streams), before uvicorn closes its sockets and drains requests; the drain gets what is left
    of `grace_s` since the signal; the lifespan shutdown (the runtime) follows with the rest.

    A second SIGINT forces the exit: uvicorn then stops draining, and also skips the lifespan
    shutdown, which would leave running tasks claimed until their leases expire and unwritten
    completions lost. Here `on_force` runs (the runtime's grace is over) and the lifespan shutdown
    runs all the same, waiting for nothing.

    It also does not re-raise the stop signal after a graceful shutdown: uvicorn does, which turns
    Ctrl-C into a KeyboardInterrupt traceback and SIGTERM into a kill that skips atexit (and so
    leaves the embedded database running). The shutdown already happened, so exit normally.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_stop: Callable[[], None] | None = None,
        on_force: Callable[[], None] | None = None,
        grace_s: float = 0.0,
    ) -> None:
        super().__init__(config)
        self._on_stop = on_stop
        self._on_force = on_force
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_at: float | None = None

    async def _serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super()._serve(sockets)
        self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first, forced = not self.should_exit, self.force_exit
        super().handle_exit(sig, frame)
        if self._loop is None:
            return
        # a signal handler runs between two bytecodes of whatever the loop was doing: hand the
        # work to the loop rather than touch its state from here
        if first and sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.call_soon_threadsafe(self._stop_now)
        if self.force_exit and not forced:
            self._loop.call_soon_threadsafe(self._force_now)

    def _stop_now(self) -> None:
        if self._stop_at is not None:
            return
        self._stop_at = asyncio.get_running_loop().time()
        if self._on_stop is not None:
            self._on_stop()

    def _force_now(self) -> None:
        self._stop_now()
        if self._on_force is not None:
            self._on_force()

    async def shutdown(self, sockets: Any = None) -> None:
        self._stop_now()  # also when the server stops for another reason than a signal
        now = asyncio.get_running_loop().time()
        left = self._grace_s - (now - (self._stop_at if self._stop_at is not None else now))
        # uvicorn hands this to asyncio.wait_for, which takes any real number of seconds
        self.config.timeout_graceful_shutdown = max(left, MIN_DRAIN_S)  # type: ignore[assignment]
        await super().shutdown(sockets)
        lifespan = self.lifespan
        if self.force_exit and isinstance(lifespan, LifespanOn) and not lifespan.shutdown_event.is_set():
            # forced before the lifespan shutdown, which uvicorn then skips: the application's
            # stop still runs (on_force told it to wait for nothing), or the tasks this process
            # runs would stay claimed until their leases expire, each losing an attempt. Requests
            # still running are cut first, as at the end of a drain, not left to meet closed pools.
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, forced exit")
            await lifespan.shutdown()
