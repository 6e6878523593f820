"""What the sync and async clients share: how a call is described, retried and answered."""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from taskgate.errors import ApiError

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 503})
# the server's answer to a repeat of an Idempotency-Key whose first request is still being stored
IN_FLIGHT = "urn:taskgate:problem:idempotency-in-flight"
DEFAULT_MAX_RETRIES = 5
MAX_RETRY_DELAY_S = 30.0
USER_AGENT = "taskgate-python/0.1.0"


@dataclass
class Call(Generic[T]):
    """One API call: the request and how its answer becomes a typed value."""

    method: str
    path: str
    answer: TypeAdapter[T] | None
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # read timeout beyond the client's (long-polls)
    # set when a success answer carried Retry-After (a long-poll a stopping server ended early):
    # how long to wait before sending the call again (bounded as every Retry-After is)
    retry_after_s: float | None = None
    # each time the server carries it out it makes something new (an enqueue without an
    # Idempotency-Key): never sent again once it may have been carried out, a 503 included
    once: bool = False
    # the server answers it sent again as it answered it the first time, by a natural key (a
    # signal's task, name and data; a schedule's name and definition) or because what it asks for
    # is done once (a cancel): sent again after its answer was lost, as a read is
    safe: bool = False
    # how to tell, when the call sent again is refused (409), that an earlier send did it (a
    # cancel whose first send cancelled the task): this read, and what its answer must show
    confirm: Confirm[T] | None = None
    # a delete whose answer is nothing: a 404 to it sent again, after an earlier send may have
    # been carried out, says that send deleted it (what was asked is done), not that it never was
    gone_when_absent: bool = False

    @property
    def resendable(self) -> bool:
        """Whether sending it again after it may have reached the server is safe: a read, a
        request whose Idempotency-Key the server answers with what the first request made, or one
        the server answers again as it did the first time (`safe`)."""
        return self.method in ("GET", "HEAD") or "Idempotency-Key" in self.headers or self.safe

    def parse(self, response: httpx.Response) -> T:
        if self.answer is None or response.status_code == 204:
            return None  # type: ignore[return-value]
        return self.answer.validate_json(response.content)


@dataclass
class Confirm(Generic[T]):
    """A read that tells whether a call refused when sent again (409) was done by an earlier send."""

    read: Call[T]
    done: Callable[[T], bool]


def maybe_done(response: httpx.Response | None, error: Exception | None) -> bool:
    """Whether a send answered so (then sent again) may have been carried out by the server: a
    503 (PostgreSQL lost after the commit, a proxy's 503 after the work) or an answer lost after
    the request left; not a 429 or a connection that never opened."""
    if error is not None:
        return not isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return response is not None and response.status_code == 503


def adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def model_json(model: BaseModel) -> Any:
    """A pydantic model as JSON, as its own JSON Schema (the contract registered for a kind, which
    the server checks payloads and results against) and `model_validate` name its fields: by alias.
    All its fields: a None may be required."""
    return model.model_dump(mode="json", by_alias=True)


def dump(value: Any) -> Any:
    """A JSON-ready body: pydantic models dumped (`model_json`), datetimes as RFC 3339, UUIDs
    (task ids) as text."""
    if isinstance(value, BaseModel):
        return model_json(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    return value


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def api_error(response: httpx.Response) -> ApiError:
    body: Any = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = response.text[:2000]
    problem = body if isinstance(body, dict) else {}
    return ApiError(
        response.status_code,
        type=str(problem.get("type", "about:blank")),
        title=problem.get("title") or response.reason_phrase,
        detail=problem.get("detail") or (None if problem else str(body)[:500] or None),
        errors=problem.get("errors") if isinstance(problem.get("errors"), list) else None,
        request_id=response.headers.get("x-request-id"),
        body=body,
    )


def retry_after_s(response: httpx.Response | None, attempt: int) -> float:
    """Retry-After (seconds or an HTTP date), else exponential backoff with jitter; bounded."""
    if response is not None:
        value = response.headers.get("retry-after")
        if value:
            try:
                return min(MAX_RETRY_DELAY_S, max(0.0, float(value)))
            except ValueError:
                pass
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):  # neither seconds nor a date: the usual backoff
                when = None
            if when is not None:
                return min(MAX_RETRY_DELAY_S, max(0.0, when.timestamp() - time.time()))
    return float(min(MAX_RETRY_DELAY_S, random.uniform(0.1, 0.5 * 2**attempt)))  # noqa: S311


def reconnect_hint_s(name: str, data: str) -> float | None:
    """How long an event stream's server asks to wait before reconnecting, from one of its
    messages (the SSE `retry` field, or the `shutdown` event's `retry_after_s`); bounded."""
    try:
        if name == SSE_RETRY:
            return min(MAX_RETRY_DELAY_S, int(data) / 1000)
        if name == "shutdown":
            value = json.loads(data).get("retry_after_s")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return min(MAX_RETRY_DELAY_S, max(0.0, float(value)))
    except (ValueError, AttributeError):
        pass
    return None


def should_retry(
    response: httpx.Response | None, error: Exception | None, resendable: bool = False, *, once: bool = False
) -> bool:
    """Whether to send a call again (after `retry_after_s`): 429 and 503, and a request that
    surely never reached the server. A `resendable` call (a read, or one with an Idempotency-Key) also after
    its answer was lost (a read timeout, a dropped connection) and while its first request is
    still in flight (409 idempotency-in-flight): the server makes its tasks once per key.

    A call made `once` is not sent again after a 503: the server answers 503 when PostgreSQL is
    lost while it stores a task, and the commit may have happened (its answer lost on the way
    back), as a proxy's 503 may come after the server did the work. A 429 refused it first."""
    if error is not None:
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            return True  # the request surely never reached the server: safe to send again
        return resendable and isinstance(error, (httpx.TimeoutException, httpx.NetworkError,
                                                 httpx.RemoteProtocolError))  # fmt: skip
    if response is None:
        return False
    if response.status_code == 503 and once:
        return False
    if response.status_code in RETRY_STATUSES:
        return True
    return resendable and response.status_code == 409 and _problem_type(response) == IN_FLIGHT


def _problem_type(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
    return str(body.get("type")) if isinstance(body, dict) else None


def build_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


# the name under which `sse_events` hands on the SSE `retry` field (the reconnection time in
# milliseconds, digits only): not an event, and no event of the stream can be named so
SSE_RETRY = "\x00retry"
# the name under which `sse_events` hands on a message's SSE `id` field, right after the message:
# sent back as `Last-Event-ID` when the stream is opened again, the server resumes after it
SSE_ID = "\x00id"
# the name under which `sse_events` hands on a comment line (a keep-alive: the stream is open)
SSE_COMMENT = "\x00comment"


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, read line by line; a `retry` field as
    (SSE_RETRY, its milliseconds) where it appears, a message's `id` field as (SSE_ID, the id)
    right after the message it came with, a comment (a keep-alive) as (SSE_COMMENT, its text).
    A message is told once its blank line arrives."""
    event: str = "message"
    data: list[str] = []
    last_id: str | None = None
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event, "\n".join(data)
            if last_id is not None:
                yield SSE_ID, last_id
            event, data, last_id = "message", [], None
        elif line.startswith(":"):
            yield SSE_COMMENT, line[1:].strip()
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\x00" not in value:
                last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                yield SSE_RETRY, value
    # a message the stream ended in (no blank line after it) is cut short: not dispatched, as
    # the SSE spec says (yielded without its id, the stream resumed would send it again)
