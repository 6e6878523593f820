"""OpenTelemetry: one trace from the caller's traceparent through the request, the enqueue, the
attempt and the outbound HTTP request, read from the SDK's in-memory exporter; and, with tracing
off, the client's traceparent kept with the task for its deliveries and remote workers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once

from app.src.utils import tracing
from tests.integration.test_http_kind import WORKER as HTTP_WORKER
from tests.integration.test_http_kind import Target, answer
from tests.integration.test_remote_workers import claim, register
from tests.task_harness import enqueue, fetch

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def _reset_global_provider() -> None:
    # the API lets a process set its provider once; tests put it back (as OpenTelemetry's own do)
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    tracing._active = False  # what tracing.active() remembered of the provider before


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server = Target()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_global_provider()


async def test_one_trace_runs_from_the_callers_request_to_the_outbound_delivery(
    serving: Any,
    auth_headers: dict[str, str],
    target: Target,
    spans: InMemorySpanExporter,
    clean_database: str,
) -> None:
    target.routes["/hook"] = answer(200, "ok")
    app = await serving(**HTTP_WORKER)
    client = app.test_client()
    response = await client.post(
        "/api/tasks",
        json={"kind": "http", "payload": {"url": target.url("/hook"), "method": "POST", "json": {"a": 1}}},
        headers={**auth_headers, "traceparent": TRACEPARENT},
    )
    assert response.status_code == 201
    task = await response.get_json()
    done = await (await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)).get_json()
    assert done["status"] == "completed"

    finished = {span.name: span for span in spans.get_finished_spans()}
    request = finished["POST /api/tasks"]
    enqueue_span = finished["taskgate.enqueue"]
    attempt = finished["taskgate.attempt http"]
    outbound = finished["POST"]
    # one trace, the caller's, and each span the child of the one before
    for span in (request, enqueue_span, attempt, outbound):
        assert format(span.context.trace_id, "032x") == CALLER_TRACE
    assert format(request.parent.span_id, "016x") == CALLER_SPAN
    assert request.kind is SpanKind.SERVER
    assert request.attributes["http.response.status_code"] == 201
    assert enqueue_span.parent.span_id == request.context.span_id
    assert attempt.parent.span_id == enqueue_span.context.span_id
    assert attempt.attributes["taskgate.task_id"] == task["id"]
    assert outbound.parent.span_id == attempt.context.span_id
    assert outbound.kind is SpanKind.CLIENT
    assert outbound.attributes["http.response.status_code"] == 200
    # the destination received the client span as its parent
    (delivery,) = target.to("/hook")
    assert (
        delivery.headers["traceparent"] == f"00-{CALLER_TRACE}-{format(outbound.context.span_id, '016x')}-01"
    )
    # the task keeps the enqueue span's context
    (row,) = await fetch(clean_database, "SELECT traceparent FROM tasks WHERE id = $1::uuid", task["id"])
    assert row["traceparent"] == f"00-{CALLER_TRACE}-{format(enqueue_span.context.span_id, '016x')}-01"


async def test_without_tracing_the_callers_traceparent_reaches_deliveries_and_remote_workers(
    serving: Any, auth_headers: dict[str, str], target: Target
) -> None:
    target.routes["/hook"] = answer(200, "ok")
    app = await serving(**HTTP_WORKER)
    client = app.test_client()
    headers = {**auth_headers, "traceparent": TRACEPARENT}
    response = await client.post(
        "/api/tasks", json={"kind": "http", "payload": {"url": target.url("/hook")}}, headers=headers
    )
    task = await response.get_json()
    await client.get(f"/api/tasks/{task['id']}?wait=20", headers=auth_headers)
    (delivery,) = target.to("/hook")
    assert delivery.headers["traceparent"] == TRACEPARENT
    await register(client, auth_headers)
    await enqueue(client, headers, kind="reports.build", payload={"account_id": 1})
    await enqueue(client, {**auth_headers, "traceparent": "not a traceparent"}, kind="reports.build",
                  payload={"account_id": 2})  # fmt: skip
    items = sorted(
        (await claim(client, auth_headers, max=10))["items"], key=lambda i: i["payload"]["account_id"]
    )
    assert [item["traceparent"] for item in items] == [TRACEPARENT, None]  # a malformed one is dropped
