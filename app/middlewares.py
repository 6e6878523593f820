"""Transport middleware: request context, security headers, metrics, problem+json errors.

Authentication and authorization live here too (`requires_scopes`, `public`), so one file says
how a request is identified and what it may do.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from pydantic import ValidationError
from quart import Quart, Response, current_app, g, request
from quart.wrappers import Request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from app.database import RETRY_AFTER_S, StorageUnavailable, is_contended, is_refused_text
from app.settings import ACCESS_LOGGER
from app.src.api.errors import (
    AppError,
    BadRequest,
    Forbidden,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    field_errors,
    problem_type,
)
from app.src.utils import json_provider, json_text, tracing
from app.src.utils.metrics import HTTP_LATENCY, HTTP_REQUESTS, LabelCache

log = structlog.get_logger("taskgate.http")
# one line per request (ACCESS_LOG_LEVEL; OFF turns it off): the stdlib logger is asked first, so
# a disabled access log costs one level check, not a formatted line
access_log = structlog.get_logger(ACCESS_LOGGER)
_ACCESS = logging.getLogger(ACCESS_LOGGER)
_LEVELS = logging.getLevelNamesMapping()

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
PROBLEM_JSON = "application/problem+json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SCHEMA_ATTRIBUTE = "_quart_schema_request_schema"

F = TypeVar("F", bound=Callable[..., Any])
_REQUESTS = LabelCache(HTTP_REQUESTS)
_LATENCY = LabelCache(HTTP_LATENCY)


class TaskgateRequest(Request):
    """Malformed JSON is a client error with a problem body, not a bare 400 page."""

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        """Quart's get_json, reading bytes: Quart decodes the body as text outside its ValueError
        handler (invalid UTF-8 became a 500) and the parsers' RecursionError escapes it too."""
        if cache and self._cached_json[silent] is not Ellipsis:
            return self._cached_json[silent]
        if not (force or self.is_json):
            return None
        raw = await self.get_data(cache=cache, as_text=False)
        max_depth = current_app.config["TASKGATE_SETTINGS"].SERVER_MAX_JSON_DEPTH
        try:
            result = json_provider.loads(raw, max_depth=max_depth)
        except (ValueError, RecursionError) as error:
            result = None if silent else self.on_json_loading_failed(error)
        if cache:
            self._cached_json[silent] = result
        return result

    def on_json_loading_failed(self, error: Exception) -> Any:
        if isinstance(error, json_provider.TooDeep):
            raise BadRequest(
                f"The request body nests JSON deeper than {error.max_depth} levels.",
                type=problem_type("json-too-deep"),
            )
        if isinstance(error, UnicodeDecodeError):
            raise BadRequest("The request body is not valid UTF-8.", type=problem_type("malformed-json"))
        raise BadRequest("The request body is not valid JSON.", type=problem_type("malformed-json"))


def problem_response(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    body.setdefault("instance", request.path)
    response: Response = current_app.json.response(body)  # type: ignore[assignment]
    response.status_code = status
    response.mimetype = PROBLEM_JSON
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def header(name: str) -> str | None:
    """A request header or None. (Werkzeug's `get` and `in` raise and catch an exception for a
    missing header, which showed in the enqueue profile.)"""
    wanted = name.lower()
    for key, value in request.headers.items():
        if key.lower() == wanted:
            return value
    return None


def new_request_id() -> str:
    return os.urandom(16).hex()


async def before_request() -> None:
    """Every request: its context, then who is calling, then the body type. One hook, because
    each registered hook costs the request path an await and its own view lookup."""
    view = None if request.url_rule is None else current_app.view_functions.get(request.url_rule.endpoint)
    bind_request_context()
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    g.trace = tracing.start_request(request.method, route, request.headers)
    await authenticate(view)
    require_json_body(view)


def bind_request_context() -> None:
    supplied = header(REQUEST_ID_HEADER)
    g.request_id = supplied if supplied and _REQUEST_ID.match(supplied) else new_request_id()
    g.started = time.perf_counter()
    # each request runs in its own asyncio task, hence its own copy of the context: nothing bound
    # by an earlier request is visible here, so there is nothing to clear
    structlog.contextvars.bind_contextvars(request_id=g.request_id)


def require_json_body(view: Callable[..., Any] | None) -> None:
    """415 for a body-taking endpoint called with anything but JSON."""
    if request.method not in _BODY_METHODS or view is None:
        return
    if hasattr(view, _SCHEMA_ATTRIBUTE) and not request.is_json:
        raise AppError(
            "Send the body as application/json.",
            status=415,
            type=problem_type("unsupported-media-type"),
        )


_HARDENING = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]
_HSTS = [("Strict-Transport-Security", "max-age=63072000; includeSubDomains")]
_API_CSP = [("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")]


async def finish_response(response: Response) -> Response:
    request_id = getattr(g, "request_id", None) or new_request_id()
    if request.method == "HEAD" and response.mimetype == "text/event-stream":
        # Quart sends a HEAD's body (the server drops it): an event stream's lasts as long as its
        # task, holding the connection for nothing. The headers are the whole answer.
        response.set_data(b"")
    headers = response.headers
    headers[REQUEST_ID_HEADER] = request_id
    if current_app.extensions["taskgate"].shutting_down.is_set():
        # The server closes its connections as it drains: a client that sent its next request on
        # this one would see it cut. Told now, it opens a new one (refused, or another replica).
        headers["Connection"] = "close"
    # appended, not set: no view sets these, and set() scans the list for each one
    headers.extend(_HARDENING)
    settings = current_app.config["TASKGATE_SETTINGS"]
    if settings.tls_enabled or request.scheme == "https":
        headers.extend(_HSTS)
    path = request.path
    if path.startswith("/api/"):
        headers.set("Cache-Control", "no-store")  # set: the event stream names it too
        headers.extend(_API_CSP)
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    status = str(response.status_code)
    started = getattr(g, "started", None)
    _REQUESTS(request.method, route, status).inc()
    elapsed = None if started is None else time.perf_counter() - started
    if elapsed is not None:
        _LATENCY(request.method, route, status).observe(elapsed)
    tracing.end_request(getattr(g, "trace", None), response.status_code)
    level = settings.ACCESS_LOG_LEVEL
    if level != "OFF" and _ACCESS.isEnabledFor(number := _LEVELS[level]):
        client_id = getattr(g, "client_id", None)
        access_log.log(
            number,
            "request",
            method=request.method,
            route=route,
            path=path,
            status=response.status_code,
            duration_ms=None if elapsed is None else round(elapsed * 1000, 3),
            request_id=request_id,
            client_id=None if client_id is None else str(client_id),
        )
    return response


async def handle_app_error(error: AppError) -> Response:
    return problem_response(error.problem(), error.status, error.headers)


async def handle_storage_unavailable(error: StorageUnavailable) -> Response:
    """The one place an unreachable database becomes an answer: 503 with Retry-After."""
    log.warning("database unavailable", error=str(error))
    return await handle_app_error(
        ServiceUnavailable("The database is unavailable; retry shortly.", retry_after=error.retry_after_s)
    )


async def handle_validation_error(error: RequestSchemaValidationError) -> Response:
    cause = error.validation_error
    if isinstance(cause, ValidationError):
        errors = field_errors(cause.errors(include_url=False, include_input=False))
    else:
        errors = [{"field": None, "message": "The body must be a JSON object.", "type": "type_error"}]
    source = "query" if type(error).__name__.startswith("Querystring") else "body"
    prefix_errors = [{**e, "field": f"{source}.{e['field']}" if e["field"] else source} for e in errors]
    return await handle_app_error(
        AppError(
            "The request did not match the expected schema.",
            status=422,
            type=problem_type("validation"),
            title="Invalid request",
            errors=prefix_errors,
        )
    )


async def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    headers = {}
    if status == 405 and error.get_response().headers.get("Allow"):
        headers["Allow"] = error.get_response().headers["Allow"]
    return problem_response({"type": "about:blank", "title": error.name, "status": status}, status, headers)


async def handle_unexpected(error: Exception) -> Response:
    if is_refused_text(error):
        # the field-level checks name the field; this is the net under every text they do not cover
        # (the statement failed, so nothing was stored)
        return await handle_app_error(
            Unprocessable(f"The request cannot be stored: {json_text.NUL_MESSAGE}.")
        )
    if is_contended(error):
        # a deadlock or serialization conflict with another transaction: the statement was rolled
        # back, nothing was changed, and the same request succeeds when retried
        log.warning("request ended by a database conflict", error=str(error))
        return await handle_app_error(
            ServiceUnavailable(
                "The database ended this request in a conflict; retry.", retry_after=RETRY_AFTER_S
            )
        )
    log.exception("unhandled error", error_type=type(error).__name__)
    return problem_response({"type": "about:blank", "title": "Internal Server Error", "status": 500}, 500)


def public(view: F) -> F:
    """Mark a view as reachable without authentication (checked by the route meta-test)."""
    view.taskgate_public = True  # type: ignore[attr-defined]
    return view


def requires_scopes(*scopes: str) -> Callable[[F], F]:
    """Declare the scopes a view needs; `authenticate` enforces them before the view runs.

    `@requires_scopes()` with no scope admits any authenticated principal.
    """

    def mark(view: F) -> F:
        view.taskgate_scopes = frozenset(scopes)  # type: ignore[attr-defined]
        return view

    return mark


def requires_operator(view: F) -> F:
    """Only an operator session may call this view (403 for API clients), besides any scopes."""
    view.taskgate_operator = True  # type: ignore[attr-defined]
    if getattr(view, "taskgate_scopes", None) is None:
        view.taskgate_scopes = frozenset()  # type: ignore[attr-defined]
    return view


def bearer_token() -> str | None:
    """The request's `Authorization: Bearer` token, or None."""
    scheme, _, token = (header("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def not_authenticated() -> Unauthorized:
    return Unauthorized(
        "Send a valid API key or session token as 'Authorization: Bearer <token>'.",
        headers={"WWW-Authenticate": 'Bearer realm="taskgate"'},
    )


def still_allowed(*scopes: str) -> Callable[[], Awaitable[bool]]:
    """For a request that waits (a long-poll, an event stream): whether its token would still be
    let in with `scopes` now (not revoked, its client not disabled, its session not ended), to
    ask again after a wait and before acting on it, as the next request would be refused."""
    token, authenticator = bearer_token() or "", current_app.extensions["taskgate"].authenticator
    needed = frozenset(scopes)

    async def allowed() -> bool:
        principal = await authenticator.identify(token)
        return principal is not None and needed <= principal.scopes

    return allowed


async def authenticate(view: Callable[..., Any] | None) -> None:
    """Bearer token → principal → g.client_id / g.profile; 401 without one, 403 without a scope.

    Views are either `@public` or declare `@requires_scopes(...)`; a view with neither is refused,
    so a forgotten decorator fails closed.
    """
    g.principal = None
    if request.method == "OPTIONS":
        return
    if view is None or getattr(view, "taskgate_public", False):
        return
    needed: frozenset[str] | None = getattr(view, "taskgate_scopes", None)
    if needed is None:
        if request.path.startswith("/api/"):
            raise Forbidden("This route declares no scopes.")
        return
    token = bearer_token()
    runtime = current_app.extensions["taskgate"]
    principal = await runtime.authenticator.authenticate(token) if token else None
    if principal is None:
        raise not_authenticated()
    g.principal = principal
    g.client_id = principal.client_id
    g.profile = principal
    g.operator_id = principal.operator_id  # None for API clients
    structlog.contextvars.bind_contextvars(client_id=str(principal.client_id))
    missing = sorted(needed - principal.scopes)
    if missing:
        raise Forbidden(f"This route needs the scope(s): {', '.join(missing)}.")
    if getattr(view, "taskgate_operator", False) and principal.kind != "operator":
        raise Forbidden("This route needs an operator session.")


def install(app: Quart) -> None:
    """Wire the middleware into an app; called once by create_app."""
    app.request_class = TaskgateRequest
    app.before_request(before_request)
    app.after_request(finish_response)
    app.register_error_handler(AppError, handle_app_error)
    app.register_error_handler(StorageUnavailable, handle_storage_unavailable)
    app.register_error_handler(RequestSchemaValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
