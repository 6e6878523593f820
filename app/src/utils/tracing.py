"""OpenTelemetry traces: request → enqueue → attempt → outbound HTTP, joined by W3C traceparent.

Tracing is on when a real tracer provider is installed: `configure()` installs one that exports
over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the exporter is the optional extra
`taskgate[otlp]`); tests install one with the SDK's in-memory exporter. Otherwise every helper
here is a cheap no-op, so the enqueue and claim paths pay nothing for tracing they do not use.

A task keeps the traceparent it was enqueued under (the enqueue span's, or the client's own
`traceparent` header when tracing is off): its attempts continue that trace, its `http`
deliveries carry it to the destination, and remote workers receive it with the claim.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import structlog
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

log = structlog.get_logger("taskgate.tracing")

# version 00 as W3C Trace Context writes it; later versions may append fields
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[^\s]{0,200})?$")
TRACER_NAME = "taskgate"
_configured = False
_active = False


def active() -> bool:
    """True when spans are recorded somewhere (an SDK tracer provider is installed).

    Asked several times per task on the claim and enqueue paths. A process's tracer provider is
    set at most once (OpenTelemetry refuses a second), so once on, tracing stays on: remembered."""
    global _active
    if not _active:
        _active = isinstance(trace.get_tracer_provider(), TracerProvider)
    return _active


def configure(*, service_name: str) -> bool:
    """Install the OTLP-exporting provider when OTEL_EXPORTER_OTLP_ENDPOINT is set (once per
    process); returns whether tracing is on."""
    global _configured
    if _configured or active() or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return active()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed "
            "(pip install 'taskgate[otlp]'); traces are off"
        )
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    log.info("tracing on", endpoint=os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def valid_traceparent(value: str | None) -> str | None:
    return value if value and _TRACEPARENT.match(value.strip().lower()) else None


def current_traceparent() -> str | None:
    """The traceparent of the current span, if one is recording."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> context.Context | None:
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})


# --- the request span (app/middlewares.py) -------------------------------------------------------


def start_request(method: str, route: str, headers: Any) -> tuple[Any, object] | None:
    """A server span continuing the caller's traceparent, made current; None when tracing is off."""
    if not active():
        return None
    parent = propagate.extract(
        {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
    )
    span = tracer().start_span(f"{method} {route}", context=parent, kind=SpanKind.SERVER)
    span.set_attribute("http.request.method", method)
    span.set_attribute("http.route", route)
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_request(started: tuple[Any, object] | None, status: int) -> None:
    if started is None:
        return
    span, token = started
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    with contextlib.suppress(Exception):  # a request ended in another context than it began
        context.detach(token)  # type: ignore[arg-type]


# --- enqueue, attempt, outbound --------------------------------------------------------------------


@contextlib.contextmanager
def enqueue_span(count: int, supplied: str | None) -> Iterator[str | None]:
    """Around an enqueue: yields the traceparent to store with its tasks (the enqueue span's, or
    the client's own when tracing is off)."""
    if not active():
        yield valid_traceparent(supplied)
        return
    with tracer().start_as_current_span("taskgate.enqueue", kind=SpanKind.INTERNAL) as span:
        span.set_attribute("taskgate.tasks", count)
        yield current_traceparent()


@contextlib.contextmanager
def attempt_span(
    *, traceparent: str | None, task_id: str, kind: str, queue: str, attempt: int
) -> Iterator[Any]:
    """The span of one attempt, a child of the span the task was enqueued under."""
    if not active():
        yield None
        return
    with tracer().start_as_current_span(
        f"taskgate.attempt {kind}", context=context_of(traceparent), kind=SpanKind.CONSUMER
    ) as span:
        span.set_attribute("taskgate.task_id", task_id)
        span.set_attribute("taskgate.kind", kind)
        span.set_attribute("taskgate.queue", queue)
        span.set_attribute("taskgate.attempt", attempt)
        yield span


@contextlib.contextmanager
def outbound_span(method: str, url: str, *, fallback: str | None) -> Iterator[tuple[dict[str, str], Any]]:
    """A client span for an outbound request; yields the headers that carry it (or, with tracing
    off, the task's stored traceparent) and the span (None when off)."""
    if not active():
        yield ({"traceparent": fallback} if fallback else {}), None
        return
    with tracer().start_as_current_span(f"{method}", kind=SpanKind.CLIENT) as span:
        span.set_attribute("http.request.method", method)
        span.set_attribute("url.full", url)
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers, span
