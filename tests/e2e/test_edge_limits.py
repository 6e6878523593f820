"""The real server against hostile connections: huge heads, slow heads, idle and surplus connections.

Each is refused or cut quickly with the process still serving (that none delays a stop is
checked in test_shutdown.py).
"""

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator

import aiohttp
import pytest

from app.database import Database
from tests.conftest import make_client
from tests.e2e.conftest import ServerProcess, start_server, wait_ready

LIMITS = {
    "SERVER_HEADER_TIMEOUT_S": "1",
    "SERVER_BODY_TIMEOUT_S": "1",
    "SERVER_KEEP_ALIVE_S": "1",
    "SERVER_MAX_CONNECTIONS": "4",
    "WORKER_SHUTDOWN_GRACE_S": "1",
}
REQUEST = b"GET /api/common/health HTTP/1.1\r\nHost: localhost\r\n"


@pytest.fixture(scope="module")
def limited(database_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that leave it serving (they need no data)."""
    process = start_server(database_uri, tmp_path_factory.mktemp("limited"), env=LIMITS)
    try:
        yield process
    finally:
        process.stop()


def port_of(server: ServerProcess) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


async def connect(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port_of(server), ssl=server.ssl_context(), server_hostname="localhost"
    )


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                return data
            if not chunk:
                return data
            data += chunk


def silent_tls_socket(server: ServerProcess) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port_of(server)), timeout=5)
    return server.ssl_context().wrap_socket(raw, server_hostname="localhost")


async def still_serving(server: ServerProcess) -> None:
    connector = aiohttp.TCPConnector(ssl=server.ssl_context())
    async with aiohttp.ClientSession(base_url=server.base_url, connector=connector) as session:
        await wait_ready(session, timeout=30)


@pytest.mark.parametrize("size", [1024 * 1024, 64 * 1024 * 1024], ids=["1 MiB", "64 MiB"])
async def test_a_huge_request_header_is_refused_with_431_at_once(limited: ServerProcess, size: int) -> None:
    await still_serving(limited)
    reader, writer = await connect(limited)

    async def send() -> None:
        writer.write(REQUEST + b"X-Filler: ")
        chunk = b"a" * (256 * 1024)
        with_sent = 0
        try:
            while with_sent < size:
                writer.write(chunk)
                await writer.drain()
                with_sent += len(chunk)
        except (ConnectionError, ssl.SSLError):
            pass  # refused: the server stopped reading

    started = time.monotonic()
    sender = asyncio.create_task(send())
    answer = await read_until_closed(reader, timeout=5)
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"application/problem+json" in answer
    assert elapsed < 1.0
    await still_serving(limited)


async def test_a_head_trickled_byte_by_byte_is_cut_after_the_header_timeout(limited: ServerProcess) -> None:
    await still_serving(limited)
    reader, writer = await connect(limited)
    started = time.monotonic()

    async def trickle() -> None:
        try:
            for byte in REQUEST + b"X-Slow: " + b"z" * 1000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, ssl.SSLError):
            pass

    sender = asyncio.create_task(trickle())
    answer = await read_until_closed(reader, timeout=5)
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert 0.9 < elapsed < 2.0
    await still_serving(limited)


@pytest.mark.parametrize(
    ("head", "answer_status"),
    [
        # the application waits for the body (a login reads its JSON): the client gets a 408
        (b"POST /api/auth/login", b"408"),
        # answered before the body (no token: 401; a GET reads no body): then closed
        (b"POST /api/tasks", b"401"),
        (b"GET /api/common/health", b"200"),
    ],
    ids=["read by the application", "answered before it", "never read"],
)
async def test_a_body_trickled_byte_by_byte_is_cut_after_the_body_timeout(
    limited: ServerProcess, head: bytes, answer_status: bytes
) -> None:
    """A request whose head came in time but whose body trickles in (a byte every 0.2 s, well
    within the keep-alive) held its connection for ever: uvicorn reads the rest of a body it has
    answered for as long as bytes keep coming, each byte putting off the keep-alive timeout, and
    the application waited 60 s for a body it reads. A thousand such connections, no key needed,
    refused every other client of the process (503 at SERVER_MAX_CONNECTIONS) for as long as the
    trickle went on. A body is now cut SERVER_BODY_TIMEOUT_S after its head."""
    await still_serving(limited)
    reader, writer = await connect(limited)
    writer.write(
        head + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    started = time.monotonic()

    async def trickle() -> None:
        try:
            for _ in range(1000):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (ConnectionError, ssl.SSLError):
            pass

    sender = asyncio.create_task(trickle())
    answer = await read_until_closed(reader, timeout=5)
    elapsed = time.monotonic() - started
    sender.cancel()
    writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 " + answer_status + b" "), answer[:200]
    if answer_status == b"408":
        assert b"application/problem+json" in answer
    assert elapsed < 2.5  # SERVER_BODY_TIMEOUT_S is 1 s, plus the linger
    await still_serving(limited)
    assert "Exception in ASGI application" not in limited.log()


async def test_idle_connections_are_closed(limited: ServerProcess) -> None:
    await still_serving(limited)
    # one that never asks anything, one kept alive after an answer
    silent_reader, silent = await connect(limited)
    kept_reader, kept = await connect(limited)
    kept.write(REQUEST + b"\r\n")
    started = time.monotonic()
    silent_data, kept_data = await asyncio.gather(
        read_until_closed(silent_reader, timeout=5), read_until_closed(kept_reader, timeout=5)
    )
    elapsed = time.monotonic() - started
    assert silent_data == b""
    assert kept_data.startswith(b"HTTP/1.1 200 ")
    assert elapsed < 2.5  # SERVER_HEADER_TIMEOUT_S and SERVER_KEEP_ALIVE_S are 1 s, plus the linger
    for writer in (silent, kept):
        writer.transport.abort()


async def test_connections_beyond_the_limit_get_503_with_retry_after(limited: ServerProcess) -> None:
    await still_serving(limited)
    held = [await connect(limited) for _ in range(4)]
    extra_reader, extra = await connect(limited)
    extra.write(REQUEST + b"\r\n")
    answer = await read_until_closed(extra_reader, timeout=5)
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"retry-after: 1" in answer.lower()
    assert b"application/problem+json" in answer
    for _, writer in held:
        writer.transport.abort()
    extra.transport.abort()
    await asyncio.sleep(0.2)
    await still_serving(limited)


async def test_a_websocket_handshake_is_answered_as_plain_http_not_a_500(limited: ServerProcess) -> None:
    """Taskgate serves no WebSocket, but uvicorn accepted the upgrade and handed the app a
    websocket scope, where the problem+json handler had no request: every handshake, from anyone
    and to any path, was a text/plain 500 and an error traceback in the log."""
    await still_serving(limited)
    for path, status in ((b"/api/common/health", b"200"), (b"/api/tasks", b"401"), (b"/nowhere", b"404")):
        reader, writer = await connect(limited)
        writer.write(
            b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = await read_until_closed(reader, timeout=5)
        writer.transport.abort()
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
        if status != b"200":
            assert b"application/problem+json" in answer, answer[:400]
    assert "Exception in ASGI application" not in limited.log()


async def test_a_request_http_cannot_parse_is_a_problem_400(limited: ServerProcess) -> None:
    """uvicorn's own answer was text/plain; every error of the API is problem+json."""
    reader, writer = await connect(limited)
    writer.write(REQUEST + b"A header without a colon\r\n\r\n")
    answer = await read_until_closed(reader, timeout=5)
    writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: application/problem+json" in answer.lower(), answer
    await still_serving(limited)


async def test_large_bodies_past_the_process_budget_are_answered_503_before_they_are_read(
    server: ServerProcess, db: Database
) -> None:
    """Parsed, a JSON body of many small values takes some 30 times its size (an 8 MiB one of empty
    objects ~270 MB), and only SERVER_MAX_CONNECTIONS bounded how many such bodies one process
    held at once (1,000 x 8 MiB). Large bodies now count against a process budget from head to
    response: past it, a head is answered 503 with Retry-After before its body is read, and a body
    given up returns its share."""
    issued = await make_client(db, "large bodies")
    length = 8 * 1024 * 1024 - 1024
    head = (
        b"POST /api/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + issued.api_key.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )
    held = []
    for _ in range(4):  # 32 MiB: the whole budget, each body begun and still coming
        reader, writer = await connect(server)
        writer.write(head + b"[")
        await writer.drain()
        held.append((reader, writer))
    try:
        await asyncio.sleep(0.5)  # their heads are read
        reader, writer = await connect(server)
        writer.write(head)
        answer = await read_until_closed(reader, timeout=5)
        writer.transport.abort()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"retry-after: 1\r\n" in answer.lower()
        assert b"application/problem+json" in answer

        gone = held.pop()[1]  # one client goes away: its share comes back
        gone.transport.abort()
        gone.close()
        await asyncio.sleep(0.5)
        reader, writer = await connect(server)
        writer.write(head + b"x" * length)
        await writer.drain()
        answer = await read_until_closed(reader, timeout=20)
        writer.transport.abort()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]  # admitted, read, and not JSON
    finally:
        for _, writer in held:
            writer.transport.abort()
            writer.close()
    assert "Exception in ASGI application" not in server.log()
