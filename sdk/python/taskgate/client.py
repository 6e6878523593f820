"""`Client` (blocking) and `AsyncClient`: the whole Taskgate API, typed.

Both send the same calls (taskgate._calls); 429 and 503 answers and connection failures are
retried up to `max_retries` times, honouring Retry-After (each wait at most 30 s). `enqueue` and
`enqueue_many` send an Idempotency-Key unless told not to, so a retried enqueue never makes two
tasks: with a key they are also sent again when the answer is lost after the request left (a read
timeout, a dropped connection) and while the key's first request is still in flight (409); without
one (`idempotent=False`) they are never sent again once they may have reached the server.
`signal`, `create_schedule` and `delete_schedule` are sent again like reads (the server answers the
same one again as the first time), and so are `delete_kind` (whose 404 then says an earlier send
deleted it) and the calls that set what they carry (`put_queue`, `pause_queue`, `resume_queue`,
`register_kind`, `update_schedule`); a `cancel` refused when sent again returns the task if it is
cancelled; `retry`, `trigger_schedule` and `purge_queue` are never sent again once they may have
been carried out.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx

from taskgate import _calls as calls
from taskgate._calls import TaskId
from taskgate._core import (
    DEFAULT_MAX_RETRIES,
    SSE_COMMENT,
    SSE_ID,
    Call,
    api_error,
    build_headers,
    maybe_done,
    reconnect_hint_s,
    retry_after_s,
    should_retry,
    sse_events,
)
from taskgate.errors import TaskgateError, TimeoutExceeded
from taskgate.models import Attempt, Kind, Page, Queue, Schedule, Task, TaskEvent, TaskPage, WorkerInfo

T = TypeVar("T")
Tasks = list[Task]
Attempts = list[Attempt]
Queues = list[Queue]
Schedules = list[Schedule]
Kinds = list[Kind]
Workers = list[WorkerInfo]
Steps = list[dict[str, Any]]
Verify = bool | str | ssl.SSLContext
# an event stream that failed or ended without an event this many times in a row is given up (an
# error is raised); one that delivered an event or a keep-alive starts the count again
MAX_EVENT_RECONNECTS = 20
# The server sends a keep-alive comment every 15 s on an event stream: three of them missed and
# the connection is taken for dead (a ReadTimeout) and opened again, never waited on for ever.
EVENTS_SILENCE_S = 45.0


class _Config:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        verify: Verify,
        timeout_s: float,
        max_retries: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        # a CA bundle path becomes a context (httpx no longer takes paths)
        self.tls: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.extra_headers = dict(headers or {})
        self.headers = build_headers(api_key, headers)

    def timeout(self, call: Call[Any]) -> httpx.Timeout:
        read = self.timeout_s if call.timeout is None else max(self.timeout_s, call.timeout)
        return httpx.Timeout(self.timeout_s, read=read)


def _refused_delay(response: httpx.Response, refused: int, max_retries: int) -> float:
    """How long to wait before opening an event stream again that was answered with an error:
    429 and 503 are retried after Retry-After, `max_retries` times in a row; others raise."""
    if refused < max_retries and should_retry(response, None):
        return retry_after_s(response, refused)
    raise api_error(response)


def _stream_hint_s(response: httpx.Response) -> float | None:
    """An event stream's Retry-After (a server that ends it at once, shutting down), bounded."""
    return retry_after_s(response, 0) if response.headers.get("retry-after") else None


def _or(value: float | None, otherwise: float | None) -> float | None:
    return otherwise if value is None else value


def _streams_ended(task_id: TaskId) -> TaskgateError:
    return TaskgateError(
        f"the event stream of task {task_id} ended {MAX_EVENT_RECONNECTS + 1} times in a row without an "
        "event before the task was terminal"
    )


def _task_specs(tasks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [calls.task_body(**dict(t)) for t in tasks]


class Client:
    """A blocking client: `Client("https://localhost:8080", api_key=KEY, verify=False)`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        verify: Verify = True,
        timeout_s: float = 30.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.config = _Config(base_url, api_key, verify, timeout_s, max_retries, headers)
        self.own_http = http is None  # a transport passed in is not copied by AsyncClient.like
        self._http = http or httpx.Client(
            base_url=self.config.base_url,
            headers=self.config.headers,
            verify=self.config.tls,
            timeout=timeout_s,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections this client opened (an `http=` client passed in stays open: its
        owner closes it)."""
        if self.own_http:
            self._http.close()

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        uncertain = False  # an earlier send may have been carried out (its answer a 503, or lost)
        while True:
            response: httpx.Response | None = None
            error: Exception | None = None
            try:
                response = self._http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=call.headers,
                    timeout=self.config.timeout(call),
                )  # fmt: skip
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.config.max_retries and should_retry(
                response, error, call.resendable, once=call.once
            ):
                uncertain = uncertain or maybe_done(response, error)
                time.sleep(retry_after_s(response, attempt))
                attempt += 1
                continue
            if error is not None:
                raise error
            assert response is not None
            if response.status_code >= 400:
                if uncertain and response.status_code == 409 and call.confirm is not None:
                    # refused when sent again: an earlier send may have done it (a cancel whose
                    # first answer was lost, and the task is cancelled now)
                    done = self._run(call.confirm.read)
                    if call.confirm.done(done):
                        return done
                if uncertain and response.status_code == 404 and call.gone_when_absent:
                    return None  # type: ignore[return-value]  # (a delete: deleted by an earlier send)
                raise api_error(response)
            if response.headers.get("retry-after"):
                call.retry_after_s = retry_after_s(response, attempt)
            return call.parse(response)

    def _every(self, page: Callable[[str | None], Call[Page[T]]]) -> list[T]:
        """A whole list, following `next_cursor` from its first page to its last."""
        items: list[T] = []
        cursor: str | None = None
        while True:
            answer = self._run(page(cursor))
            items += answer.items
            # (a server older than pages answers no cursor; one handing the same cursor back ends)
            if not answer.next_cursor or answer.next_cursor == cursor:
                return items
            cursor = answer.next_cursor

    # --- tasks -----------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        concurrency_key: str | None = None,
        debounce: Mapping[str, Any] | None = None,
        depends_on: Sequence[TaskId] | None = None,
        idempotency_key: str | None = None,
        idempotent: bool = True,
    ) -> Task:
        """Enqueue one task. An Idempotency-Key is sent (a fresh one unless given) unless
        `idempotent=False`; a repeat with the same key returns the original task.
        `concurrency_key` puts it under its queue's key_concurrency and key_rate_limit_per_s;
        `debounce={"key": ..., "period_s": ..., "max_wait_s": ...}` folds it into a pending task of
        the same debounce key (the answer's `debounced` says so)."""
        body = calls.task_body(kind, payload, queue=queue, run_at=run_at, delay_s=delay_s, priority=priority,
                               max_attempts=max_attempts, concurrency_key=concurrency_key,
                               debounce=debounce,
                               depends_on=[str(d) for d in depends_on] if depends_on else None)  # fmt: skip
        return self._run(calls.enqueue(body, idempotency_key=idempotency_key, idempotent=idempotent))

    def enqueue_many(
        self,
        tasks: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        idempotent: bool = True,
    ) -> Tasks:
        """Enqueue up to 1000 tasks at once, all or nothing; each is a dict of `enqueue`'s arguments."""
        call = calls.enqueue_many(_task_specs(tasks), idempotency_key=idempotency_key, idempotent=idempotent)
        return self._run(call)["items"]

    def get(self, task_id: TaskId) -> Task:
        return self._run(calls.get(task_id))

    def wait(self, task_id: TaskId, *, timeout_s: float = 30.0, raise_on_timeout: bool = False) -> Task:
        """The task once terminal (long-polls the server), or as it is after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            call = calls.get(task_id, wait_s=max(0.0, remaining))
            task = self._run(call)
            if task.terminal:
                return task
            if deadline - time.monotonic() <= 0:
                if raise_on_timeout:
                    raise TimeoutExceeded(f"task {task_id} is still {task.status} after {timeout_s} s")
                return task
            if call.retry_after_s:  # a stopping server ended the long-poll at once: not a tight loop
                time.sleep(min(call.retry_after_s, max(0.0, deadline - time.monotonic())))

    def list(
        self,
        *,
        queue: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TaskPage:
        """One page of tasks, newest first; pass `next_cursor` back for the next page."""
        return self._run(calls.list_tasks(queue=queue, status=status, kind=kind, limit=limit, cursor=cursor))

    def iter_tasks(
        self,
        *,
        queue: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        page_size: int = 100,
    ) -> Iterator[Task]:
        """Every matching task, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(queue=queue, status=status, kind=kind, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, task_id: TaskId) -> Task:
        return self._run(calls.cancel(task_id))

    def retry(self, task_id: TaskId) -> Task:
        return self._run(calls.retry(task_id))

    def attempts(self, task_id: TaskId) -> Attempts:
        """Every finished attempt of the task, in the order they ended (page after page)."""
        return self._every(lambda cursor: calls.attempts(task_id, cursor))

    def signal(self, task_id: TaskId, name: str, data: Any = None) -> Any:
        """Send signal `name` to a task (kept until its `ctx.wait_signal(name)` takes it)."""
        return self._run(calls.signal(task_id, name, data))

    def steps(self, task_id: TaskId) -> Steps:
        """The steps a composed task stored: [{name, result, created_at}] (all of them: the
        server's pages are followed)."""
        return self._every(lambda cursor: calls.steps(task_id, cursor=cursor))

    def events(self, task_id: TaskId) -> Iterator[TaskEvent]:
        """Status and progress changes until the task is terminal, each once (reconnects if the
        stream drops or ends early, sending `Last-Event-ID`: the server resumes after the last
        message it had). Never ends before the terminal event: after MAX_EVENT_RECONNECTS
        failures in a row it raises."""
        reconnects = 0
        refused = 0  # 429/503 answers in a row: retried after Retry-After, as every call is
        last_id: str | None = None  # the SSE id of the last message: the server resumes after it
        while True:
            delay_s: float | None = None
            hint_s: float | None = None  # how long the server asked to wait before reconnecting
            try:
                with self._http.stream(
                    "GET", calls.events_path(task_id), headers=_events_headers(last_id),
                    timeout=httpx.Timeout(self.config.timeout_s, read=EVENTS_SILENCE_S),
                ) as response:  # fmt: skip
                    if response.status_code >= 400:
                        response.read()
                        delay_s = _refused_delay(response, refused, self.config.max_retries)
                        refused += 1
                    else:
                        refused = 0
                        hint_s = _stream_hint_s(response)
                        for name, data in sse_events(response.iter_lines()):
                            if name in (SSE_ID, SSE_COMMENT):
                                # a resumed stream sends nothing while nothing changes: a message
                                # or a keep-alive shows it serves, and starts the count again
                                reconnects = 0
                                last_id = data if name == SSE_ID else last_id
                                continue
                            if name != "task":
                                hint_s = _or(reconnect_hint_s(name, data), hint_s)
                                continue
                            event = TaskEvent.model_validate(json.loads(data))
                            reconnects = 0  # the stream served: only failures in a row count
                            yield event
                            if event.terminal:
                                return
            except httpx.TransportError:
                if reconnects >= MAX_EVENT_RECONNECTS:
                    raise
            if delay_s is not None:
                time.sleep(delay_s)
                continue
            reconnects += 1
            if reconnects > MAX_EVENT_RECONNECTS:
                raise _streams_ended(task_id)
            # no sooner than the server asked (the SSE `retry` field, a shutdown's retry_after_s)
            time.sleep(max(min(5.0, 0.2 * reconnects), hint_s or 0.0))

    # --- queues, schedules, catalog, workers -----------------------------------------------------

    def put_queue(self, name: str, **settings: Any) -> Queue:
        return self._run(calls.put_queue(name, settings))

    def get_queue(self, name: str) -> Queue:
        return self._run(calls.get_queue(name))

    def queues(self) -> Queues:
        """Every queue of this client, in name order (page after page)."""
        return self._every(calls.list_queues)

    def pause_queue(self, name: str) -> Any:
        return self._run(calls.queue_action(name, "pause"))

    def resume_queue(self, name: str) -> Any:
        return self._run(calls.queue_action(name, "resume"))

    def purge_queue(self, name: str) -> Any:
        return self._run(calls.queue_action(name, "purge"))

    def create_schedule(
        self, name: str, cron: str, task: Mapping[str, Any], *, timezone: str = "UTC", paused: bool = False
    ) -> Schedule:
        return self._run(calls.create_schedule(name, cron, task, timezone=timezone, paused=paused))

    def schedules(self) -> Schedules:
        """Every schedule of this client, newest first (page after page)."""
        return self._every(calls.list_schedules)

    def get_schedule(self, schedule_id: TaskId) -> Schedule:
        return self._run(calls.schedule("GET", schedule_id))

    def update_schedule(self, schedule_id: TaskId, **changes: Any) -> Schedule:
        return self._run(calls.update_schedule(schedule_id, changes))

    def delete_schedule(self, schedule_id: TaskId) -> Schedule:
        return self._run(calls.delete_schedule(schedule_id))

    def trigger_schedule(self, schedule_id: TaskId) -> Task:
        return self._run(calls.trigger_schedule(schedule_id))

    def kinds(self) -> Kinds:
        """Every kind: the deployment's, then this client's remote kinds (page after page)."""
        return self._every(calls.kinds)

    def register_kind(
        self,
        name: str,
        *,
        payload_schema: Mapping[str, Any],
        result_schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
    ) -> Kind:
        call = calls.register_kind(
            name,
            payload_schema=payload_schema,
            result_schema=result_schema,
            description=description,
            max_attempts=max_attempts,
        )
        return self._run(call)

    def delete_kind(self, name: str) -> None:
        self._run(calls.delete_kind(name))

    def workers(self) -> Workers:
        """Every worker seen in the last 10 minutes, in id order (page after page)."""
        return self._every(calls.workers)


class AsyncClient:
    """The same API, async: `async with AsyncClient(url, api_key=KEY) as tg: await tg.enqueue(...)`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        verify: Verify = True,
        timeout_s: float = 30.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
        max_connections: int = 100,
    ) -> None:
        self.config = _Config(base_url, api_key, verify, timeout_s, max_retries, headers)
        self.own_http = http is None
        self._http = http or httpx.AsyncClient(
            base_url=self.config.base_url,
            headers=self.config.headers,
            verify=self.config.tls,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    @classmethod
    def like(cls, client: Client) -> AsyncClient:
        """An AsyncClient with the same address, key, headers, TLS, timeout and retries as `client`.

        A Client built on its own `http=` client cannot be copied (its transport, proxies, auth
        and hooks are sync-only): that raises ValueError; build an AsyncClient instead."""
        if not client.own_http:
            raise ValueError(
                "a Client built with http=... cannot be copied into an AsyncClient; "
                "pass an AsyncClient (with its own http=httpx.AsyncClient(...)) instead"
            )
        c = client.config
        return cls(
            c.base_url, api_key=c.api_key, verify=c.verify, timeout_s=c.timeout_s,
            max_retries=c.max_retries, headers=c.extra_headers,
        )  # fmt: skip

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections this client opened (an `http=` client passed in stays open)."""
        if self.own_http:
            await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        uncertain = False  # an earlier send may have been carried out (its answer a 503, or lost)
        while True:
            response: httpx.Response | None = None
            error: Exception | None = None
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=call.headers,
                    timeout=self.config.timeout(call),
                )  # fmt: skip
            except httpx.TransportError as exc:
                error = exc
            if attempt < self.config.max_retries and should_retry(
                response, error, call.resendable, once=call.once
            ):
                uncertain = uncertain or maybe_done(response, error)
                await asyncio.sleep(retry_after_s(response, attempt))
                attempt += 1
                continue
            if error is not None:
                raise error
            assert response is not None
            if response.status_code >= 400:
                if uncertain and response.status_code == 409 and call.confirm is not None:
                    # refused when sent again: an earlier send may have done it (a cancel whose
                    # first answer was lost, and the task is cancelled now)
                    done = await self._run(call.confirm.read)
                    if call.confirm.done(done):
                        return done
                if uncertain and response.status_code == 404 and call.gone_when_absent:
                    return None  # type: ignore[return-value]  # (a delete: deleted by an earlier send)
                raise api_error(response)
            if response.headers.get("retry-after"):
                call.retry_after_s = retry_after_s(response, attempt)
            return call.parse(response)

    async def _every(self, page: Callable[[str | None], Call[Page[T]]]) -> list[T]:
        """A whole list, following `next_cursor` from its first page to its last."""
        items: list[T] = []
        cursor: str | None = None
        while True:
            answer = await self._run(page(cursor))
            items += answer.items
            # (a server older than pages answers no cursor; one handing the same cursor back ends)
            if not answer.next_cursor or answer.next_cursor == cursor:
                return items
            cursor = answer.next_cursor

    async def enqueue(
        self,
        kind: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        concurrency_key: str | None = None,
        debounce: Mapping[str, Any] | None = None,
        depends_on: Sequence[TaskId] | None = None,
        idempotency_key: str | None = None,
        idempotent: bool = True,
    ) -> Task:
        body = calls.task_body(kind, payload, queue=queue, run_at=run_at, delay_s=delay_s, priority=priority,
                               max_attempts=max_attempts, concurrency_key=concurrency_key,
                               debounce=debounce,
                               depends_on=[str(d) for d in depends_on] if depends_on else None)  # fmt: skip
        return await self._run(calls.enqueue(body, idempotency_key=idempotency_key, idempotent=idempotent))

    async def enqueue_many(
        self,
        tasks: Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        idempotent: bool = True,
    ) -> Tasks:
        call = calls.enqueue_many(_task_specs(tasks), idempotency_key=idempotency_key, idempotent=idempotent)
        return (await self._run(call))["items"]

    async def get(self, task_id: TaskId) -> Task:
        return await self._run(calls.get(task_id))

    async def wait(self, task_id: TaskId, *, timeout_s: float = 30.0, raise_on_timeout: bool = False) -> Task:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            call = calls.get(task_id, wait_s=max(0.0, deadline - loop.time()))
            task = await self._run(call)
            if task.terminal:
                return task
            if deadline - loop.time() <= 0:
                if raise_on_timeout:
                    raise TimeoutExceeded(f"task {task_id} is still {task.status} after {timeout_s} s")
                return task
            if call.retry_after_s:  # a stopping server ended the long-poll at once: not a tight loop
                await asyncio.sleep(min(call.retry_after_s, max(0.0, deadline - loop.time())))

    async def list(
        self,
        *,
        queue: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TaskPage:
        return await self._run(
            calls.list_tasks(queue=queue, status=status, kind=kind, limit=limit, cursor=cursor)
        )

    async def iter_tasks(
        self,
        *,
        queue: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Task]:
        cursor: str | None = None
        while True:
            page = await self.list(queue=queue, status=status, kind=kind, limit=page_size, cursor=cursor)
            for task in page.items:
                yield task
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, task_id: TaskId) -> Task:
        return await self._run(calls.cancel(task_id))

    async def retry(self, task_id: TaskId) -> Task:
        return await self._run(calls.retry(task_id))

    async def attempts(self, task_id: TaskId) -> Attempts:
        """Every finished attempt of the task, in the order they ended (page after page)."""
        return await self._every(lambda cursor: calls.attempts(task_id, cursor))

    async def signal(self, task_id: TaskId, name: str, data: Any = None) -> Any:
        """Send signal `name` to a task (kept until its `ctx.wait_signal(name)` takes it)."""
        return await self._run(calls.signal(task_id, name, data))

    async def steps(self, task_id: TaskId) -> Steps:
        """The steps a composed task stored: [{name, result, created_at}] (all of them: the
        server's pages are followed)."""
        return await self._every(lambda cursor: calls.steps(task_id, cursor=cursor))

    async def events(self, task_id: TaskId) -> AsyncIterator[TaskEvent]:
        reconnects = 0
        refused = 0  # 429/503 answers in a row: retried after Retry-After, as every call is
        last_id: str | None = None  # the SSE id of the last message: the server resumes after it
        while True:
            delay_s: float | None = None
            hint_s: float | None = None  # how long the server asked to wait before reconnecting
            try:
                async with self._http.stream(
                    "GET", calls.events_path(task_id), headers=_events_headers(last_id),
                    timeout=httpx.Timeout(self.config.timeout_s, read=EVENTS_SILENCE_S),
                ) as response:  # fmt: skip
                    if response.status_code >= 400:
                        await response.aread()
                        delay_s = _refused_delay(response, refused, self.config.max_retries)
                        refused += 1
                    else:
                        refused = 0
                        hint_s = _stream_hint_s(response)
                        async for name, data in _sse(response):
                            if name in (SSE_ID, SSE_COMMENT):
                                # a resumed stream sends nothing while nothing changes: a message
                                # or a keep-alive shows it serves, and starts the count again
                                reconnects = 0
                                last_id = data if name == SSE_ID else last_id
                                continue
                            if name != "task":
                                hint_s = _or(reconnect_hint_s(name, data), hint_s)
                                continue
                            event = TaskEvent.model_validate(json.loads(data))
                            reconnects = 0  # the stream served: only failures in a row count
                            yield event
                            if event.terminal:
                                return
            except httpx.TransportError:
                if reconnects >= MAX_EVENT_RECONNECTS:
                    raise
            if delay_s is not None:
                await asyncio.sleep(delay_s)
                continue
            reconnects += 1
            if reconnects > MAX_EVENT_RECONNECTS:
                raise _streams_ended(task_id)
            # no sooner than the server asked (the SSE `retry` field, a shutdown's retry_after_s)
            await asyncio.sleep(max(min(5.0, 0.2 * reconnects), hint_s or 0.0))

    async def put_queue(self, name: str, **settings: Any) -> Queue:
        return await self._run(calls.put_queue(name, settings))

    async def get_queue(self, name: str) -> Queue:
        return await self._run(calls.get_queue(name))

    async def queues(self) -> Queues:
        """Every queue of this client, in name order (page after page)."""
        return await self._every(calls.list_queues)

    async def pause_queue(self, name: str) -> Any:
        return await self._run(calls.queue_action(name, "pause"))

    async def resume_queue(self, name: str) -> Any:
        return await self._run(calls.queue_action(name, "resume"))

    async def purge_queue(self, name: str) -> Any:
        return await self._run(calls.queue_action(name, "purge"))

    async def create_schedule(
        self, name: str, cron: str, task: Mapping[str, Any], *, timezone: str = "UTC", paused: bool = False
    ) -> Schedule:
        return await self._run(calls.create_schedule(name, cron, task, timezone=timezone, paused=paused))

    async def schedules(self) -> Schedules:
        """Every schedule of this client, newest first (page after page)."""
        return await self._every(calls.list_schedules)

    async def get_schedule(self, schedule_id: TaskId) -> Schedule:
        return await self._run(calls.schedule("GET", schedule_id))

    async def update_schedule(self, schedule_id: TaskId, **changes: Any) -> Schedule:
        return await self._run(calls.update_schedule(schedule_id, changes))

    async def delete_schedule(self, schedule_id: TaskId) -> Schedule:
        return await self._run(calls.delete_schedule(schedule_id))

    async def trigger_schedule(self, schedule_id: TaskId) -> Task:
        return await self._run(calls.trigger_schedule(schedule_id))

    async def kinds(self) -> Kinds:
        """Every kind: the deployment's, then this client's remote kinds (page after page)."""
        return await self._every(calls.kinds)

    async def register_kind(
        self,
        name: str,
        *,
        payload_schema: Mapping[str, Any],
        result_schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
    ) -> Kind:
        call = calls.register_kind(
            name,
            payload_schema=payload_schema,
            result_schema=result_schema,
            description=description,
            max_attempts=max_attempts,
        )
        return await self._run(call)

    async def delete_kind(self, name: str) -> None:
        await self._run(calls.delete_kind(name))

    async def workers(self) -> Workers:
        """Every worker seen in the last 10 minutes, in id order (page after page)."""
        return await self._every(calls.workers)

    # --- the remote worker protocol (used by taskgate.Worker) ------------------------------------

    async def claim(
        self,
        kinds: Sequence[str],
        *,
        worker: Mapping[str, Any],
        queues: Sequence[str] | None = None,
        max: int = 10,
        wait_s: float = 10.0,
    ) -> Any:
        call = calls.claim(kinds, worker=worker, queues=queues, max=max, wait_s=wait_s)
        claim = await self._run(call)
        claim.retry_after_s = call.retry_after_s  # a stopping server: claim again after this
        return claim

    async def heartbeat(
        self,
        task_ids: Sequence[TaskId],
        *,
        worker: Mapping[str, Any],
        progress: Mapping[str, Any] | None = None,
    ) -> Any:
        return await self._run(calls.heartbeat(task_ids, worker=worker, progress=progress))

    async def complete(self, items: Sequence[Mapping[str, Any]], *, worker: Mapping[str, Any]) -> Any:
        return (await self._run(calls.complete(items, worker=worker)))["items"]


def _events_headers(last_id: str | None) -> dict[str, str]:
    if last_id is None:
        return {"Accept": "text/event-stream"}
    return {"Accept": "text/event-stream", "Last-Event-ID": last_id}


async def _sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs as each blank line closes one: an SSE stream is long-lived."""
    pending: list[str] = []
    async for line in response.aiter_lines():
        pending.append(line)
        if not line.rstrip("\r"):
            for event in sse_events(iter(pending)):
                yield event
            pending = []
    for event in sse_events(iter(pending)):
        yield event
