"""One delivery of an `http` task: gate, sign, send, and turn the answer into a task outcome.

Outcome rules (SPEC, "The `http` kind"): a success code (2xx unless `success_codes` says
otherwise) completes; a network error, a timeout, 408, 429 and 5xx retry with backoff, honouring
Retry-After; any other answer (4xx, an unfollowed redirect...) discards at once, as does a refused
destination. With follow_async, a 202 with Location hands the task to the poller (poller.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar
from uuid import UUID

import aiohttp
from yarl import URL

from app.src.api.http import RESOURCE_KEY
from app.src.api.http.client import (
    REDIRECTS,
    ForbiddenDestination,
    HttpResponse,
    LookupBusy,
    NextHop,
    OutboundHttp,
    RedirectError,
    Signer,
    destination,
    forbidden_reason,
    join_location,
    within,
)
from app.src.api.http.gate import HostHealth
from app.src.api.http.signing import sign_delivery
from app.src.api.kinds import (
    Deferred,
    PermanentError,
    RetryLater,
    TaskCancelled,
    TaskContext,
    WaitExternal,
)
from app.src.api.models.http import MAX_REDIRECTS, HttpPayload, HttpResult, HttpWaitState
from app.src.utils import json_text, tracing
from app.src.utils.metrics import DELIVERIES, DELIVERY_LATENCY

T = TypeVar("T")

FIRST_POLL_S = 1.0  # follow_async: first status poll when the 202 has no Retry-After
MAX_RETRY_AFTER_S = 30 * 86_400.0  # a Retry-After beyond this is nonsense; the queue caps it anyway
ERROR_BODY_CHARS = 300
RETRYABLE_STATUSES = frozenset({408, 429})

# waiting: a 202 handed the work to the provider; pending / see_other: what a status poll said
Answer = Literal["completed", "retry", "discarded", "waiting", "pending", "see_other"]


@dataclass(frozen=True, slots=True)
class Classified:
    answer: Answer
    reason: str
    retry_after_s: float | None = None
    location: str | None = None


def outbound(ctx: TaskContext) -> OutboundHttp:
    component = ctx.resources.get(RESOURCE_KEY)
    if not isinstance(component, OutboundHttp):
        raise RuntimeError("this process runs no OutboundHttp (the runtime starts it with the worker role)")
    return component


def classify(
    payload: HttpPayload, response: HttpResponse, *, now: datetime, accept_async: bool
) -> Classified:
    """What a response means for the task."""
    status = response.status
    location = response.headers.get("Location")
    if accept_async and payload.follow_async and status == 202 and location:
        return Classified(
            "waiting", "accepted", retry_after_s=retry_after_s(response, now=now), location=location
        )
    if payload.succeeded(status):
        return Classified("completed", f"HTTP {status}")
    reason = f"HTTP {status} {response.reason}".rstrip() + _snippet(response.body)
    if status in RETRYABLE_STATUSES or 500 <= status <= 599:
        return Classified("retry", reason, retry_after_s=retry_after_s(response, now=now))
    if status in (301, 302, 303, 307, 308) and not payload.follow_redirects:
        return Classified("discarded", reason + " (a redirect: set follow_redirects to follow it)")
    return Classified("discarded", reason)


def judge_status(payload: HttpPayload, response: HttpResponse, *, now: datetime) -> Classified:
    """What a status URL's answer means: 202 still running, a redirect (303) points at the
    result, anything else is the final answer itself."""
    location = response.headers.get("Location")
    if response.status == 202:
        return Classified(
            "pending", "still running", retry_after_s=retry_after_s(response, now=now), location=location
        )
    if response.status in REDIRECTS and location:
        return Classified("see_other", f"HTTP {response.status}", location=location)
    return classify(payload, response, now=now, accept_async=False)


# Answers that ask a caller to slow down: the host's adaptive limit halves (timeouts too).
THROTTLING = frozenset({429, 503})


def host_health(answer: Answer) -> HostHealth:
    """What the circuit learns: a retryable answer is the host failing; any other is it working."""
    return "failure" if answer == "retry" else "success"


def retry_after_s(response: HttpResponse, *, now: datetime) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # str.isdigit takes "²" too, which float() refuses
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # a year or offset no C int holds
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER_S)


def request_body(payload: HttpPayload) -> tuple[bytes | None, str | None]:
    """The bytes to send (and sign) and their default Content-Type."""
    if payload.has_json:
        return json.dumps(payload.json_body, separators=(",", ":")).encode(), "application/json"
    if payload.body is not None:
        return payload.body.encode(), "text/plain; charset=utf-8"
    return None, None


def request_headers(payload: HttpPayload, default_content_type: str | None) -> dict[str, str]:
    headers = dict(payload.headers)
    if default_content_type and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = default_content_type
    return headers


def signer_for(task_id: UUID, secrets: list[str]) -> Signer:
    """Standard Webhooks headers: webhook-id is the task id, the same on every attempt, so a
    receiver can drop duplicates; the timestamp and signatures are fresh per request."""

    def sign(body: bytes) -> Mapping[str, str]:
        timestamp = int(time.time())
        headers = {"webhook-id": str(task_id), "webhook-timestamp": str(timestamp)}
        if secrets:
            headers["webhook-signature"] = sign_delivery(
                secrets, msg_id=str(task_id), timestamp=timestamp, body=body
            )
        return headers

    return sign


async def signing_secrets(http: OutboundHttp, client_id: UUID) -> list[str]:
    try:
        return await http.signing_secrets(client_id)
    except Exception as exc:
        raise RetryLater(f"could not read the client's signing secrets: {exc}") from exc


async def unless_cancelled(ctx: TaskContext, work: Awaitable[T]) -> T:
    """Await `work`, or stop it and raise TaskCancelled when the client cancels the task."""
    job = asyncio.ensure_future(work)
    cancelled = asyncio.ensure_future(ctx.cancelled.wait())
    try:
        await asyncio.wait({job, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (job, cancelled):
            if not pending.done():
                pending.cancel()
    if job.done() and not job.cancelled():
        return job.result()
    await asyncio.gather(job, return_exceptions=True)
    raise TaskCancelled("cancelled while the request was in flight")


async def exchange(
    http: OutboundHttp,
    *,
    task_id: UUID,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    payload: HttpPayload,
    signer: Signer,
    judge: Callable[[HttpResponse], Classified],
    ctx: TaskContext | None = None,
    client_id: UUID | None = None,
) -> tuple[HttpResponse, Classified]:
    """Send under the destination's permit and `judge` the answer; failures to get one become
    RetryLater (network, timeout) or PermanentError (refused destination, bad redirect).
    Raises Deferred when the host has no free permit or its circuit is open.

    A followed redirect to another destination is sent under that destination's own permit (the
    host limit and circuit hold for it too), within the same `timeout_s` overall."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + payload.timeout_s
    started = time.perf_counter()
    redirects_left = MAX_REDIRECTS
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RetryLater(_network_error(TimeoutError(), payload.timeout_s))
        answered = await _hop(
            http,
            task_id=task_id,
            method=method,
            url=url,
            headers=headers,
            body=body,
            payload=payload,
            timeout_s=remaining,
            redirects_left=redirects_left,
            signer=signer,
            judge=judge,
            ctx=ctx,
            client_id=client_id,
        )
        if not isinstance(answered, NextHop):
            response, verdict = answered
            return dataclasses.replace(response, duration_ms=(time.perf_counter() - started) * 1000), verdict
        method, url, headers, body = answered.method, answered.url, answered.headers, answered.body
        redirects_left -= answered.redirects


async def _hop(
    http: OutboundHttp,
    *,
    task_id: UUID,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    payload: HttpPayload,
    timeout_s: float,
    redirects_left: int,
    signer: Signer,
    judge: Callable[[HttpResponse], Classified],
    ctx: TaskContext | None,
    client_id: UUID | None,
) -> tuple[HttpResponse, Classified] | NextHop:
    """One destination's part of an exchange, under its permit: the answer and its verdict, or
    the request a redirect to another destination asks for."""
    host = destination(url)
    try:
        http.check_address(URL(url, encoded=True))
    except ForbiddenDestination as exc:
        DELIVERIES(host, "refused").inc()
        raise PermanentError(str(exc)) from None
    try:
        async with http.gate.permit(
            host, task_id=task_id, timeout_s=timeout_s, client_id=client_id
        ) as permit:
            # one of the process's connections, within the wait a permit has (its lease counts
            # it); none: nothing was sent, the host did not fail
            if not await http.take_connection(http.gate.wait_s):
                raise http.gate.deferred(f"this process has {http.max_connections} requests in flight")
            try:
                started = time.perf_counter()
                try:
                    sending = http.send(
                        method=method,
                        url=url,
                        headers=headers,
                        body=body,
                        timeout_s=timeout_s,
                        follow_redirects=payload.follow_redirects,
                        signer=signer,
                        redirects_left=redirects_left,
                    )
                    response = await (unless_cancelled(ctx, sending) if ctx is not None else sending)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    if within(exc, LookupBusy) is not None:  # the process's, not the host's
                        raise http.gate.deferred(str(within(exc, LookupBusy))) from None
                    DELIVERY_LATENCY(host).observe(time.perf_counter() - started)
                    refused = forbidden_reason(exc)
                    if refused is not None:
                        DELIVERIES(host, "refused").inc()
                        raise PermanentError(refused) from None
                    if isinstance(exc, aiohttp.InvalidURL):
                        DELIVERIES(host, "discarded").inc()
                        raise PermanentError(f"invalid URL: {exc}") from None
                    permit.health = "failure"
                    permit.throttled = isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
                    DELIVERIES(host, "retry").inc()
                    raise RetryLater(_network_error(exc, payload.timeout_s)) from None
                except RedirectError as exc:
                    permit.health = "success"
                    DELIVERIES(host, "discarded").inc()
                    raise PermanentError(str(exc)) from None
                DELIVERY_LATENCY(host).observe(response.duration_ms / 1000)
                if response.next_hop is not None:
                    permit.health = "success"  # it answered: a redirect, followed at its destination
                    return response.next_hop
                verdict = judge(response)
                permit.health = host_health(verdict.answer)
                permit.throttled = response.status in THROTTLING
                DELIVERIES(host, verdict.answer).inc()
                return response, verdict
            finally:
                http.give_connection()
    except Deferred:
        DELIVERIES(host, "deferred").inc()
        raise


def _network_error(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return f"timed out after {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _snippet(body: bytes) -> str:
    if not body:
        return ""
    text = body[: ERROR_BODY_CHARS * 4].decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
    return f": {text}"


def resolve_location(base: str, location: str) -> str:
    """An absolute URL for a Location header (which may be relative to the request's URL)."""
    try:
        return str(join_location(URL(base, encoded=True), location))
    except RedirectError as exc:
        raise PermanentError(str(exc)) from None


def to_result(response: HttpResponse) -> HttpResult:
    return HttpResult(
        status=response.status,
        headers=response.headers,
        body=json_text.storable_text(response.body.decode("utf-8", errors="replace")),
        duration_ms=round(response.duration_ms, 3),
    )


async def deliver(ctx: TaskContext, payload: HttpPayload) -> HttpResult:
    """The `http` kind's handler body."""
    http = outbound(ctx)
    body, content_type = request_body(payload)
    signer = signer_for(ctx.task_id, await signing_secrets(http, ctx.client_id))
    url = str(payload.url)
    with tracing.outbound_span(payload.method, url, fallback=ctx.traceparent) as (trace_headers, span):
        response, verdict = await exchange(
            http,
            task_id=ctx.task_id,
            method=payload.method,
            url=url,
            headers={**request_headers(payload, content_type), **trace_headers},
            body=body,
            payload=payload,
            signer=signer,
            judge=lambda response: classify(payload, response, now=datetime.now(UTC), accept_async=True),
            ctx=ctx,
            client_id=ctx.client_id,
        )
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
    ctx.http_status = response.status
    if verdict.answer == "completed":
        return to_result(response)
    if verdict.answer == "retry":
        raise RetryLater(verdict.reason, after_s=verdict.retry_after_s, http_status=response.status)
    if verdict.answer == "waiting":
        now = datetime.now(UTC)
        state = HttpWaitState(
            status_url=resolve_location(response.url, verdict.location or ""),
            accepted_at=now,
            deadline=now + timedelta(seconds=payload.async_deadline_s),
        )
        first_poll = verdict.retry_after_s if verdict.retry_after_s is not None else FIRST_POLL_S
        raise WaitExternal(
            state.model_dump(mode="json"),
            poll_after_s=min(first_poll, payload.async_deadline_s),
            http_status=response.status,
        )
    raise PermanentError(verdict.reason, http_status=response.status)
