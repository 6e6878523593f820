"""(6) Hostile input: deep JSON, invalid UTF-8, a CHECK-tripping queue update, huge headers,
slow-loris and idle TLS connections (and whether they delay shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import ssl
import time
import uuid
from typing import Any

import pytest

from tests.faults.load import timed
from tests.faults.procs import Deployment, Proc, create_api_key
from tests.faults.report import Promises

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

ANSWER_WITHIN_S = 1.0
# How long a connection that never completes a request may live. No figure is in the SPEC; uvicorn's
# keep-alive default is 5 s; 15 s leaves room for any sensible header/idle timeout.
CUT_WITHIN_S = 15.0
OBSERVE_S = 30.0  # a connection still open after this is reported as surviving >= 30 s
GRACE_S = 3.0


def deep(levels: int, core: str = "") -> bytes:
    return ('{"kind": "noop", "payload": {"x": ' + "[" * levels + core + "]" * levels + "}}").encode()


async def raw_request(
    proc: Proc, context: ssl.SSLContext, head: bytes, filler: int
) -> tuple[int, str, float]:
    """Send a request whose X-Big header is `filler` bytes; (status or 0, content type, seconds)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proc.port, ssl=context, server_hostname="localhost"
    )
    status, content_type = 0, ""
    try:
        async with asyncio.timeout(15):
            with contextlib.suppress(OSError):
                writer.write(head + b"X-Big: ")
                chunk = b"a" * 65536
                sent = 0
                while sent < filler:
                    writer.write(chunk[: min(len(chunk), filler - sent)])
                    sent += len(chunk)
                    await writer.drain()
                writer.write(b"\r\n\r\n")
                await writer.drain()
            with contextlib.suppress(OSError):
                answer = await reader.read(65536)
                match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
                status = int(match.group(1)) if match else 0
                found = re.search(rb"(?i)\r\ncontent-type: *([^\r]*)", answer)
                content_type = found.group(1).decode() if found else ""
    except TimeoutError:
        status = 0
    finally:
        writer.close()
    return status, content_type, time.monotonic() - start


async def survival(proc: Proc, context: ssl.SSLContext, *, trickle: bool) -> float:
    """Seconds until the server cuts a connection that trickles a header (or sits idle after TLS)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proc.port, ssl=context, server_hostname="localhost"
    )
    start = time.monotonic()
    closed = asyncio.create_task(reader.read(65536))
    try:
        if trickle:
            writer.write(b"GET /api/common/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        while time.monotonic() - start < OBSERVE_S:
            done, _ = await asyncio.wait([closed], timeout=1.0)
            if done:
                break
            if trickle:
                try:
                    writer.write(b"a")
                    await writer.drain()
                except OSError:
                    break
        return time.monotonic() - start
    finally:
        closed.cancel()
        writer.close()


async def test_hostile_input(deployment: Deployment) -> None:
    promises = Promises("6 hostile input")
    server = deployment.server("serve", roles="api", WORKER_SHUTDOWN_GRACE_S=str(GRACE_S))
    await deployment.ready(server)
    key = await asyncio.to_thread(create_api_key, deployment, "hostile")
    auth = {"Authorization": f"Bearer {key}"}
    json_headers = {**auth, "Content-Type": "application/json"}
    results: dict[str, dict[str, Any]] = {}
    context = deployment.ssl_context()

    async with deployment.session(server) as http:

        async def still_serving() -> bool:
            answer, _ = await timed(http, "GET", "/api/common/health")
            return answer.status == 200 and answer.seconds <= ANSWER_WITHIN_S

        async def expect_4xx(name: str, method: str, path: str, body: bytes | None = None, **kw: Any) -> None:
            answer, _ = await timed(http, method, path, data=body, headers=json_headers, **kw)
            serving = await still_serving()
            results[name] = {
                "status": answer.status,
                "s": round(answer.seconds, 3),
                "problem_json": answer.problem_json,
            }
            promises.check(
                400 <= answer.status < 500 and answer.problem_json and answer.seconds <= ANSWER_WITHIN_S,
                f"{name}: {method} {path} answered {answer.status or answer.error}"
                f"{' problem+json' if answer.problem_json else ''} in {answer.seconds:.2f} s "
                "(4xx problem+json within 1 s expected)",
            )
            promises.check(serving, f"{name}: the server did not answer /api/common/health after it")

        await expect_4xx("deep JSON 600", "POST", "/api/tasks", deep(600))
        await expect_4xx("deep JSON 100k", "POST", "/api/tasks", deep(100_000))
        await expect_4xx(
            "deep JSON 600 + 20-digit int", "POST", "/api/tasks", deep(600, "12345678901234567890")
        )
        await expect_4xx(
            "deep JSON 100k + 20-digit int", "POST", "/api/tasks", deep(100_000, "12345678901234567890")
        )

        # invalid UTF-8 on every route that takes a JSON body (read from the served OpenAPI document)
        _, spec = await timed(http, "GET", "/openapi.json")
        routes = []
        for path, operations in (spec or {}).get("paths", {}).items():
            for method, operation in operations.items():
                content = (operation.get("requestBody") or {}).get("content", {})
                if "application/json" in content:
                    concrete = re.sub(r"\{[^}]*id\}", str(uuid.uuid4()), path)
                    routes.append((method.upper(), re.sub(r"\{[^}]*\}", "faults", concrete)))
        promises.record(json_routes=len(routes))
        promises.check(bool(routes), "the OpenAPI document lists no route with a JSON body")
        for method, path in routes:
            await expect_4xx(f"invalid UTF-8 {method} {path}", method, path, b'{"name": "\xff\xfe\xfd"}')

        # min_backoff_s above 3600 after raising max_backoff_s: a valid update (min <= max), so it
        # must succeed; never a 5xx (it was a CHECK violation on the upsert's insert side)
        await timed(http, "PUT", "/api/queues/backoff", json={"max_backoff_s": 7200}, headers=auth)
        answer, _ = await timed(
            http, "PUT", "/api/queues/backoff", json={"min_backoff_s": 5000}, headers=auth
        )
        results["queue min_backoff_s 5000 after max 7200"] = {
            "status": answer.status,
            "s": round(answer.seconds, 3),
        }
        promises.check(
            answer.status in (200, 201) and answer.seconds <= ANSWER_WITHIN_S,
            f"queue min_backoff_s 5000 after max_backoff_s 7200 answered {answer.status} in "
            f"{answer.seconds:.2f} s (a valid update: 200 within 1 s expected)",
        )
        # and one that is really invalid (min above max): a 4xx problem+json
        await expect_4xx(
            "queue min_backoff_s > max_backoff_s",
            "PUT",
            "/api/queues/backoff",
            b'{"min_backoff_s": 9000, "max_backoff_s": 100}',
        )

        # huge request headers
        head = (
            f"GET /api/common/health HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n".encode()
        )
        for name, size in (("1 MiB header", 1 << 20), ("64 MiB header", 64 << 20)):
            status, content_type, seconds = await raw_request(server, context, head, size)
            serving = await still_serving()
            results[name] = {"status": status, "s": round(seconds, 3), "content_type": content_type}
            promises.check(
                400 <= status < 500 and "problem+json" in content_type and seconds <= ANSWER_WITHIN_S,
                f"{name}: answered {status or 'nothing'} ({content_type or 'no content type'}) in "
                f"{seconds:.2f} s (4xx problem+json within 1 s expected)",
            )
            promises.check(serving, f"{name}: the server did not answer /api/common/health after it")

        # slow-loris and idle TLS connections: how long do they live?
        lives = await asyncio.gather(
            *(survival(server, context, trickle=True) for _ in range(3)),
            *(survival(server, context, trickle=False) for _ in range(3)),
        )
        slow, idle = max(lives[:3]), max(lives[3:])
        promises.record(slow_loris_survives_s=round(slow, 1), idle_tls_survives_s=round(idle, 1))
        promises.check(
            slow <= CUT_WITHIN_S, f"a slow-loris connection lived {slow:.0f} s (cut within 15 s expected)"
        )
        promises.check(
            idle <= CUT_WITHIN_S, f"an idle TLS connection lived {idle:.0f} s (cut within 15 s expected)"
        )
        promises.check(await still_serving(), "the server did not answer after the slow connections")

        # they must not delay shutdown
        lingering = [
            asyncio.create_task(survival(server, context, trickle=trickle))
            for trickle in (True, True, False, False)
        ]
        await asyncio.sleep(1.5)
        signalled = server.signal(signal.SIGTERM)
        code = await server.wait_exit(GRACE_S + 30)
        shutdown_s = round(time.time() - signalled, 2) if code is not None else None
        for task in lingering:
            task.cancel()
        await asyncio.gather(*lingering, return_exceptions=True)
    failed = [name for name, r in results.items() if not (400 <= r["status"] < 500)]
    server_errors = [name for name, r in results.items() if r["status"] >= 500]
    promises.record(
        inputs=len(results),
        inputs_not_4xx=len(failed),
        **{"500s": len(server_errors)},
        shutdown_s=shutdown_s,
        exit_code=code,
        answers=results,
    )
    promises.check(
        code == 0 and shutdown_s is not None and shutdown_s <= GRACE_S + 1,
        f"with slow and idle connections open, SIGTERM exit took {shutdown_s} s, code {code} "
        f"(0 within {GRACE_S + 1} s expected)",
    )
    promises.verify()
