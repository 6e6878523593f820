"""The SDK client against a scripted transport: 429/503 retried after Retry-After (bounded),
problem+json read into ApiError, and an Idempotency-Key that stays the same across retries."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "sdk" / "python"))
import taskgate
from taskgate import _core

TASK = {
    "id": "01a20047-8222-700d-bc3e-3051b847dd5e", "queue": "default", "kind": "noop", "payload": {},
    "status": "available", "priority": 5, "attempts": 0, "max_attempts": 25,
    "run_at": "2026-12-01T00:00:00Z", "created_at": "2026-12-01T00:00:00Z",
}  # fmt: skip


def client(answers: list[httpx.Response], seen: list[httpx.Request], **options: Any) -> taskgate.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    http = httpx.Client(base_url="https://tg.test", transport=httpx.MockTransport(handle))
    return taskgate.Client("https://tg.test", api_key="k", http=http, **options)


def test_429_and_503_are_retried_after_retry_after_with_the_same_idempotency_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(taskgate.client.time, "sleep", slept.append)
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(429, headers={"Retry-After": "2"}, json={"type": "x", "title": "t", "status": 429}),
        httpx.Response(503, headers={"Retry-After": "1"}, json={"type": "x", "title": "t", "status": 503}),
        httpx.Response(201, json=TASK),
    ]
    task = client(answers, seen).enqueue("noop", {})
    assert str(task.id) == TASK["id"]
    assert slept == [2.0, 1.0]
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 3
    assert len(keys) == 1


def test_an_enqueue_without_a_key_is_sent_again_after_a_429_never_after_a_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 503 may come after the task was stored (the commit's answer lost between PostgreSQL and
    the server): without a key, sending it again can make a second task. A 429 stored nothing."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    unavailable = {"type": "urn:taskgate:problem:unavailable", "title": "t", "status": 503}
    for send in (
        lambda tg: tg.enqueue("noop", {}, idempotent=False),
        lambda tg: tg.enqueue_many([{"kind": "noop"}], idempotent=False),
    ):
        seen: list[httpx.Request] = []
        answers = [
            httpx.Response(429, headers={"Retry-After": "1"}, json={"status": 429}),
            httpx.Response(503, headers={"Retry-After": "1"}, json=unavailable),
            httpx.Response(201, json=TASK),
        ]
        with pytest.raises(taskgate.ApiError) as refused:
            send(client(answers, seen))
        assert (refused.value.status, len(seen)) == (503, 2)
        assert all("Idempotency-Key" not in r.headers for r in seen)


def test_retries_are_bounded_and_problems_become_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    seen: list[httpx.Request] = []
    busy = [httpx.Response(503, headers={"Retry-After": "3600"}, json={"status": 503}) for _ in range(3)]
    with pytest.raises(taskgate.ApiError) as busy_error:
        client(busy, seen, max_retries=2).get(TASK["id"])
    assert (busy_error.value.status, len(seen)) == (503, 3)
    huge = httpx.Response(503, headers={"Retry-After": "3600"})
    assert _core.retry_after_s(huge, 0) == _core.MAX_RETRY_DELAY_S  # a huge Retry-After is capped
    errors = [{"field": "payload.n", "message": "m", "type": "int_parsing"}]
    problem = {"type": "urn:taskgate:problem:validation", "title": "Invalid", "status": 422, "errors": errors}
    with pytest.raises(taskgate.ApiError) as invalid:
        client([httpx.Response(422, json=problem)], []).enqueue("e2e.square", {"n": "x"}, idempotent=False)
    assert invalid.value.errors[0]["field"] == "payload.n"
    assert invalid.value.type.endswith("validation")


def test_a_malformed_retry_after_falls_back_to_the_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(taskgate.client.time, "sleep", slept.append)
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(503, headers={"Retry-After": "soon"}, json={"status": 503}),
        httpx.Response(200, json=TASK),
    ]
    task = client(answers, seen).get(TASK["id"])
    assert str(task.id) == TASK["id"]
    assert len(seen) == 2
    assert 0.1 <= slept[0] <= 0.5  # the first step of the jittered backoff


def _stream(*events: dict[str, Any], ids: list[str] | None = None) -> httpx.Response:
    heads = [f"id: {i}\n" for i in ids] if ids is not None else [""] * len(events)
    body = "".join(
        f"{head}event: task\ndata: {json.dumps(e)}\n\n" for head, e in zip(heads, events, strict=True)
    )
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body.encode())


def test_events_retry_429_and_503_after_retry_after_like_every_other_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 503 (a replica shutting down, the database out of reach) or a 429 when the stream was
    (re)opened ended `events()` with an ApiError at once, where every other call waits and retries.

    And a stream opened again yielded the unchanged state a second time: `events()` now sends
    the last message's SSE id as `Last-Event-ID`, and the server resumes after it."""
    slept: list[float] = []
    monkeypatch.setattr(taskgate.client.time, "sleep", slept.append)
    running = {"id": TASK["id"], "status": "running", "attempts": 1}
    done = {**running, "status": "completed"}
    answers = [
        httpx.Response(503, headers={"Retry-After": "2"}, json={"status": 503}),
        _stream(running, ids=["r1"]),  # the stream ends (a replica stopping), then is opened again
        httpx.Response(429, headers={"Retry-After": "1"}, json={"status": 429}),
        _stream(done, ids=["c2"]),  # resumed after r1: the state it named is not sent again
    ]
    seen: list[httpx.Request] = []
    statuses = [e.status for e in client(answers, seen).events(TASK["id"])]
    assert statuses == ["running", "completed"]
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None, None, "r1", "r1"]
    assert len(seen) == 4
    assert slept == [2.0, 0.2, 1.0]  # Retry-After, the reconnect backoff, Retry-After
    busy = [httpx.Response(503, headers={"Retry-After": "1"}, json={"status": 503}) for _ in range(3)]
    with pytest.raises(taskgate.ApiError) as refused:
        list(client(busy, [], max_retries=2).events(TASK["id"]))
    assert refused.value.status == 503  # bounded, as for every call


def test_events_never_end_before_the_terminal_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams that end cleanly before the task is terminal (each replica of a rolling deploy
    ends its streams) counted against one budget for the generator's life: past it, `events()`
    ended silently, as if the task were done. Now only streams that end without an event in a
    row count, and running out of them raises."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    monkeypatch.setattr(taskgate.client, "MAX_EVENT_RECONNECTS", 2)
    running = {"id": TASK["id"], "status": "running", "attempts": 1}
    answers = [_stream(running) for _ in range(5)] + [_stream({**running, "status": "completed"})]
    statuses = [e.status for e in client(answers, []).events(TASK["id"])]
    assert statuses == ["running"] * 5 + ["completed"]
    empty = [_stream() for _ in range(3)]
    with pytest.raises(taskgate.TaskgateError, match="ended 3 times in a row"):
        list(client(empty, []).events(TASK["id"]))


def test_resumed_streams_that_only_keep_alive_do_not_use_up_the_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resumed stream sends nothing while the task does not change (the state is not sent
    again): streams that served keep-alives, then dropped (deploys of a long wait), start the
    count of failures in a row again, as streams that served an event do."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    monkeypatch.setattr(taskgate.client, "MAX_EVENT_RECONNECTS", 2)
    running = {"id": TASK["id"], "status": "running", "attempts": 1}
    alive = httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=b": keep-alive\n\n")
    answers = [_stream(running, ids=["r1"]), *[alive for _ in range(4)]]
    answers.append(_stream({**running, "status": "completed"}, ids=["c2"]))
    seen: list[httpx.Request] = []
    statuses = [e.status for e in client(answers, seen).events(TASK["id"])]
    assert statuses == ["running", "completed"]
    assert [r.headers.get("Last-Event-ID") for r in seen] == [None] + ["r1"] * 5


def test_a_message_cut_short_by_a_dropped_stream_is_not_yielded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream cut after a message's `data` line but before its end (its `id`, the blank line)
    had the message yielded anyway, without its id: the reconnect resumed from the message
    before, and the server sent it again (the change yielded twice). An SSE message is
    dispatched only when its blank line arrives."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    running = {"id": TASK["id"], "status": "running", "attempts": 1}
    half = {**running, "progress": 50}
    cut = f"event: task\ndata: {json.dumps(running)}\nid: r1\n\nevent: task\ndata: {json.dumps(half)}\n"
    answers = [
        httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=cut.encode()),
        _stream(half, {**half, "status": "completed"}, ids=["h2", "c3"]),  # resumed after r1
    ]
    seen: list[httpx.Request] = []
    events = [(e.status, e.progress) for e in client(answers, seen).events(TASK["id"])]
    assert events == [("running", None), ("running", 50), ("completed", 50)]
    assert seen[1].headers.get("Last-Event-ID") == "r1"


async def test_async_events_retry_429_and_503_too(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(taskgate.client.asyncio, "sleep", sleep)
    done = {"id": TASK["id"], "status": "completed", "attempts": 1}
    answers = [httpx.Response(503, headers={"Retry-After": "2"}, json={"status": 503}), _stream(done)]

    async def handle(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    http = httpx.AsyncClient(base_url="https://tg.test", transport=httpx.MockTransport(handle))
    async with taskgate.AsyncClient("https://tg.test", api_key="k", http=http) as tg:
        statuses = [e.status async for e in tg.events(TASK["id"])]
    assert statuses == ["completed"]
    assert slept == [2.0]


def _silent_then_done_server() -> tuple[str, list[int], threading.Event]:
    """An HTTP server whose first event stream answers its headers and then says nothing, ever
    (a peer gone without closing, a proxy holding the connection); the next one ends the task."""
    done = {"id": TASK["id"], "status": "completed", "attempts": 1}
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    listener = socket.create_server(("127.0.0.1", 0))
    opened: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        held = []
        while not stop.is_set():
            listener.settimeout(0.1)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            opened.append(1)
            if len(opened) == 1:
                conn.sendall(head)  # then silence, the connection left open
                held.append(conn)
                continue
            event = f"event: task\ndata: {json.dumps(done)}\n\n".encode()
            conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n")
            conn.close()
        for conn in held:
            conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", opened, stop


def test_an_event_stream_gone_silent_is_reopened_not_waited_on_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream was read without a read timeout: a connection that died without a word (the
    server sends a keep-alive comment every 15 s) held `events()` for ever."""
    monkeypatch.setattr(taskgate.client, "EVENTS_SILENCE_S", 0.5)
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    url, opened, stop = _silent_then_done_server()
    try:
        with taskgate.Client(url, api_key="k", timeout_s=5) as tg:
            started = time.monotonic()
            statuses = [e.status for e in tg.events(TASK["id"])]
        assert statuses == ["completed"]
        assert len(opened) == 2
        assert time.monotonic() - started < 4
    finally:
        stop.set()


async def test_an_async_event_stream_gone_silent_is_reopened_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taskgate.client, "EVENTS_SILENCE_S", 0.5)
    url, opened, stop = _silent_then_done_server()
    try:
        async with taskgate.AsyncClient(url, api_key="k", timeout_s=5) as tg:
            statuses = await asyncio.wait_for(_statuses(tg), 4)
        assert statuses == ["completed"]
        assert len(opened) == 2
    finally:
        stop.set()


async def _statuses(tg: taskgate.AsyncClient) -> list[str]:
    return [e.status async for e in tg.events(TASK["id"])]


def test_wait_honours_the_retry_after_of_a_long_poll_a_stopping_server_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server shutting down answers `?wait=` at once with the task as it is and `Retry-After: 1`;
    `wait()` asked again at once, in a tight loop, until the server closed the connection."""
    slept: list[float] = []
    monkeypatch.setattr(taskgate.client.time, "sleep", slept.append)
    running = {**TASK, "status": "running"}
    answers = [
        httpx.Response(200, headers={"Retry-After": "1"}, json=running),
        httpx.Response(200, json={**TASK, "status": "completed"}),
    ]
    seen: list[httpx.Request] = []
    task = client(answers, seen).wait(TASK["id"], timeout_s=30)
    assert task.status == "completed"
    assert slept == [1.0]


def scripted(script: list[httpx.Response | Exception], seen: list[httpx.Request]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    return httpx.Client(base_url="https://tg.test", transport=httpx.MockTransport(handle))


def test_a_read_whose_answer_was_lost_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GET changes nothing: a read timeout or a dropped connection is retried like a 503."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    seen: list[httpx.Request] = []
    lost = [
        httpx.ReadTimeout("no answer"),
        httpx.RemoteProtocolError("dropped"),
        httpx.Response(200, json=TASK),
    ]
    tg = taskgate.Client("https://tg.test", api_key="k", http=scripted(lost, seen))
    assert str(tg.get(TASK["id"]).id) == TASK["id"]
    assert [r.method for r in seen] == ["GET", "GET", "GET"]
    # a POST without a key still is not: it may have made a task already
    seen.clear()
    lost[:] = [httpx.ReadTimeout("no answer")]
    with pytest.raises(httpx.ReadTimeout):
        taskgate.Client("https://tg.test", api_key="k", http=scripted(lost, seen)).enqueue(
            "noop", {}, idempotent=False
        )
    assert len(seen) == 1


def test_closing_a_client_leaves_an_http_client_passed_in_open() -> None:
    http = scripted([httpx.Response(200, json=TASK)], [])
    taskgate.Client("https://tg.test", api_key="k", http=http).close()
    assert not http.is_closed  # its owner goes on using it
    assert taskgate.Client("https://tg.test", api_key="k", http=http).get(TASK["id"]).kind == "noop"
    own = taskgate.Client("https://tg.test", api_key="k")
    own.close()
    assert own._http.is_closed

    async def passed_in() -> bool:
        http = httpx.AsyncClient(base_url="https://tg.test")
        await taskgate.AsyncClient("https://tg.test", api_key="k", http=http).aclose()
        return http.is_closed

    assert asyncio.run(passed_in()) is False


def test_a_blank_idempotency_key_is_refused_not_replaced() -> None:
    seen: list[httpx.Request] = []
    tg = taskgate.Client("https://tg.test", api_key="k", http=scripted([], seen))
    for blank in ("", "  "):
        with pytest.raises(ValueError, match="idempotency_key"):
            tg.enqueue("noop", {}, idempotency_key=blank)
    assert seen == []  # nothing was sent


def test_an_event_streams_reconnect_hint_is_read_and_bounded() -> None:
    lines = ["retry: 1000", "event: shutdown", 'data: {"retry_after_s": 1}', ""]
    pairs = list(_core.sse_events(iter(lines)))
    assert pairs == [(_core.SSE_RETRY, "1000"), ("shutdown", '{"retry_after_s": 1}')]
    assert [_core.reconnect_hint_s(name, data) for name, data in pairs] == [1.0, 1.0]
    assert _core.reconnect_hint_s(_core.SSE_RETRY, "86400000") == _core.MAX_RETRY_DELAY_S
    assert _core.reconnect_hint_s("shutdown", '{"retry_after_s": 1e9}') == _core.MAX_RETRY_DELAY_S
    for name, data in [("shutdown", "[1]"), ("shutdown", "no json"), ("shutdown", '{"retry_after_s": "1"}'),
                       ("task", "{}")]:  # fmt: skip
        assert _core.reconnect_hint_s(name, data) is None
    assert list(_core.sse_events(iter(["retry: soon", "retry: -5", ""]))) == []  # not digits: ignored


SCHEDULE = {
    "id": "01a20047-8222-700d-bc3e-3051b847dd5f", "name": "nightly", "cron": "0 2 * * *",
    "timezone": "UTC", "task": {"queue": "default", "kind": "noop", "payload": {}}, "paused": False,
    "next_run_at": None, "last_fire_time": None, "last_task_id": None,
    "created_at": "2026-12-01T00:00:00Z", "updated_at": "2026-12-01T00:00:00Z",
}  # fmt: skip
UNAVAILABLE = {"type": "about:blank", "title": "Service Unavailable", "status": 503}


def test_calls_that_make_something_each_time_are_not_sent_again_after_a_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers 503 when PostgreSQL is lost while it stores, and the commit may have
    happened. A retry by hand, a schedule's trigger and a purge were sent again after it: a second
    retry of a task that failed again meanwhile, a second task from one trigger, and the tasks
    enqueued since the purge purged too. A 429 refused them first: still sent again."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    for send in (
        lambda tg: tg.retry(TASK["id"]),
        lambda tg: tg.trigger_schedule(SCHEDULE["id"]),
        lambda tg: tg.purge_queue("default"),
    ):
        seen: list[httpx.Request] = []
        answers = [
            httpx.Response(429, headers={"Retry-After": "1"}, json={"status": 429}),
            httpx.Response(503, headers={"Retry-After": "1"}, json=UNAVAILABLE),
            httpx.Response(200, json=TASK),
        ]
        with pytest.raises(taskgate.ApiError) as refused:
            send(client(answers, seen))
        assert (refused.value.status, len(seen)) == (503, 2), seen[0].url


def test_a_cancel_refused_when_sent_again_returns_the_task_its_first_send_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel answered 503 after its commit (or whose answer was lost) was sent again and
    refused 409 (the task is cancelled: by that first send): `cancel` raised for a task it had
    cancelled. It reads the task then, and returns it when cancelled or asked to stop."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    conflict = {"type": "about:blank", "title": "Conflict", "status": 409,
                "detail": f"Task {TASK['id']} is cancelled and can no longer be cancelled."}  # fmt: skip
    cancelled = {**TASK, "status": "cancelled", "finished_at": "2026-12-01T00:00:01Z"}
    for first in (httpx.Response(503, json=UNAVAILABLE), httpx.ReadTimeout("no answer")):
        seen: list[httpx.Request] = []
        steps: list[Any] = [first, httpx.Response(409, json=conflict), httpx.Response(200, json=cancelled)]
        tg = taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen))
        assert tg.cancel(TASK["id"]).status == "cancelled"
        assert [r.method for r in seen] == ["POST", "POST", "GET"]
    # a task that is not cancelled: the 409 stands
    done = {**TASK, "status": "completed"}
    steps = [
        httpx.Response(503, json=UNAVAILABLE),
        httpx.Response(409, json=conflict),
        httpx.Response(200, json=done),
    ]
    with pytest.raises(taskgate.ApiError) as refused:
        taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, [])).cancel(TASK["id"])
    assert refused.value.status == 409
    # a 409 to the first send is the answer: nothing is read
    seen = []
    steps = [httpx.Response(409, json=conflict)]
    with pytest.raises(taskgate.ApiError):
        taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen)).cancel(TASK["id"])
    assert len(seen) == 1


async def test_an_async_cancel_refused_when_sent_again_returns_the_task_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_sleep(_s: float) -> None:
        return None

    monkeypatch.setattr(taskgate.client.asyncio, "sleep", no_sleep)
    conflict = {"type": "about:blank", "title": "Conflict", "status": 409, "detail": "cancelled"}
    asked = {**TASK, "status": "running", "cancel_requested": True}
    steps = [
        httpx.Response(503, json=UNAVAILABLE),
        httpx.Response(409, json=conflict),
        httpx.Response(200, json=asked),
    ]
    seen: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return steps.pop(0)

    http = httpx.AsyncClient(base_url="https://tg.test", transport=httpx.MockTransport(handle))
    async with taskgate.AsyncClient("https://tg.test", api_key="k", http=http) as tg:
        task = await tg.cancel(TASK["id"])
    assert (task.status, task.cancel_requested) == ("running", True)
    assert [r.method for r in seen] == ["POST", "POST", "GET"]
    await http.aclose()


def test_a_signal_and_a_schedule_whose_answer_was_lost_are_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers the same signal (task, name, data) and the same schedule (name and
    definition) sent again as it answered them the first time: a lost answer (a read timeout, a
    dropped connection) no longer ends `signal` or `create_schedule` with an error."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    signalled = {"task_id": TASK["id"], "name": "go", "status": "available"}
    for send, answer in (
        (lambda tg: tg.signal(TASK["id"], "go", {"n": 1}), httpx.Response(202, json=signalled)),
        (
            lambda tg: tg.create_schedule("nightly", "0 2 * * *", {"kind": "noop"}),
            httpx.Response(200, json=SCHEDULE),
        ),
    ):
        seen: list[httpx.Request] = []
        steps: list[Any] = [httpx.ReadTimeout("no answer"), httpx.RemoteProtocolError("dropped"), answer]
        send(taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen)))
        assert len(seen) == 3
        assert len({r.content for r in seen}) == 1


def test_a_delete_whose_answer_was_lost_is_sent_again_and_a_404_then_is_its_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delete answered 503 after its commit, or whose answer was lost, deleted what it named:
    sent again, `delete_kind` was answered 404 and raised "not found" (after a lost answer, it
    raised the ReadTimeout without sending again). The server answers a schedule's delete sent
    again with the schedule as it was; a kind's 404 then is the delete done."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    missing = {"type": "about:blank", "title": "Not found", "status": 404, "detail": "No remote kind 'k'."}
    for first in (httpx.Response(503, json=UNAVAILABLE), httpx.ReadTimeout("no answer")):
        seen: list[httpx.Request] = []
        steps: list[Any] = [first, httpx.Response(404, json=missing)]
        tg = taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen))
        assert tg.delete_kind("k") is None
        assert [r.method for r in seen] == ["DELETE", "DELETE"]
        seen = []
        steps = [first, httpx.Response(200, json=SCHEDULE)]
        tg = taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen))
        assert str(tg.delete_schedule(SCHEDULE["id"]).id) == SCHEDULE["id"]
        assert [r.method for r in seen] == ["DELETE", "DELETE"]
    # a 404 to the first send is the answer: that kind never was
    steps = [httpx.Response(404, json=missing)]
    tg = taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, []))
    with pytest.raises(taskgate.ApiError) as refused:
        tg.delete_kind("k")
    assert refused.value.status == 404


async def test_an_async_delete_kind_answered_404_when_sent_again_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_sleep(_s: float) -> None:
        return None

    monkeypatch.setattr(taskgate.client.asyncio, "sleep", no_sleep)
    steps = [httpx.Response(503, json=UNAVAILABLE), httpx.Response(404, json={"status": 404})]
    seen: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return steps.pop(0)

    http = httpx.AsyncClient(base_url="https://tg.test", transport=httpx.MockTransport(handle))
    async with taskgate.AsyncClient("https://tg.test", api_key="k", http=http) as tg:
        assert await tg.delete_kind("k") is None
    assert [r.method for r in seen] == ["DELETE", "DELETE"]
    await http.aclose()


def test_calls_that_set_what_they_carry_are_sent_again_after_their_answer_was_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue's settings, its pause and resume, a kind's registration and a schedule's changes set
    the same again when sent again: a lost answer (read timeout, dropped connection) ended each
    with the transport error, though the server may have carried it out and a resend is harmless."""
    monkeypatch.setattr(taskgate.client.time, "sleep", lambda _s: None)
    queue = {
        "name": "reports", "paused": True, "max_attempts": 25, "min_backoff_s": 1, "max_backoff_s": 60,
        "created_at": "2026-12-01T00:00:00Z", "updated_at": "2026-12-01T00:00:00Z",
    }  # fmt: skip
    kind = {"name": "k", "payload_schema": {"type": "object"}, "remote": True}
    for send, answer in (
        (lambda tg: tg.put_queue("reports", max_concurrency=3), httpx.Response(200, json=queue)),
        (lambda tg: tg.pause_queue("reports"), httpx.Response(200, json=queue)),
        (lambda tg: tg.resume_queue("reports"), httpx.Response(200, json=queue)),
        (lambda tg: tg.register_kind("k", payload_schema={"type": "object"}), httpx.Response(200, json=kind)),
        (lambda tg: tg.update_schedule(SCHEDULE["id"], paused=True), httpx.Response(200, json=SCHEDULE)),
    ):
        seen: list[httpx.Request] = []
        steps: list[Any] = [httpx.ReadTimeout("no answer"), httpx.RemoteProtocolError("dropped"), answer]
        send(taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen)))
        assert len(seen) == 3
        assert len({(r.method, r.url, r.content) for r in seen}) == 1
    # a purge is not: the tasks enqueued since the first send would be purged too
    seen = []
    steps = [httpx.ReadTimeout("no answer")]
    with pytest.raises(httpx.ReadTimeout):
        taskgate.Client("https://tg.test", api_key="k", http=scripted(steps, seen)).purge_queue("reports")
    assert len(seen) == 1


def test_a_get_is_bounded_by_the_clients_timeout_not_ten_seconds() -> None:
    """`get(id)` read its answer with a 10 s timeout whatever the client's `timeout_s` (the margin
    meant for `wait()`'s long-poll was added to a plain read): against a server that never
    answered, a client made with `timeout_s=0.5` waited 10 s per send, `list()` 0.5 s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        held: list[socket.socket] = []
        threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with taskgate.Client(url, api_key="k", timeout_s=0.5, max_retries=0) as tg:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                tg.get(TASK["id"])
            took_s = time.monotonic() - started
        for conn in held:
            conn.close()
    assert took_s < 3
