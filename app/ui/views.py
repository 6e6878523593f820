"""/ui: the operator console's pages and actions (server-rendered; htmx only refreshes counts).

Every page and action needs a live operator session (`_authenticate`); every state-changing
request needs the session's CSRF token (`session.check_csrf`), both checked in `before_request`
before any view runs. Actions answer 303 to the page they change (post/redirect/get), except
those that show a secret once (a new API key), which render it in their own answer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import structlog
from pydantic import ValidationError
from quart import (
    Blueprint,
    Response,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
    send_from_directory,
    url_for,
)
from quart_schema import hide
from werkzeug.exceptions import HTTPException

from app.database import StorageUnavailable
from app.runtime import SHUTDOWN_RETRY_AFTER_S, Runtime
from app.src.api import bulk, console, tasks
from app.src.api.auth import clients, operators
from app.src.api.engine import flow
from app.src.api.errors import AppError, Forbidden, Unprocessable, field_errors
from app.src.api.models.auth import SCOPES, Principal
from app.src.api.models.tasks import QueueIn
from app.src.api.state_machine import TERMINAL, Status
from app.src.utils import json_provider, sse
from app.ui import session
from app.ui.charts import throughput_chart

STATIC_DIR = Path(__file__).parent / "static"
blueprint = Blueprint("ui", __name__, template_folder="templates")
log = structlog.get_logger("taskgate.ui")
blueprint.record_once(lambda state: session.install(state.app))

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PUBLIC_ENDPOINTS = frozenset({"ui.static", "ui.login", "ui.login_submit", "ui.totp", "ui.totp_submit"})
PAGE_SIZE = 50
CONSOLE_HOSTS = 500  # the hosts page shows the first 500 by name (GET /api/hosts pages through all)
_TEXT_FILTER_MAX = 64
_CURSOR_MAX = 1024
_CONSOLE_PATH = re.compile(r"/ui/[!-~]*")


def _runtime() -> Runtime:
    rt: Runtime = current_app.extensions["taskgate"]
    return rt


def _db() -> Any:
    return _runtime().db


def _engine() -> Any:
    return _runtime().engine


def _principal() -> Principal:
    principal: Principal = g.ui_principal
    return principal


# --- request hooks -------------------------------------------------------------------------------


class _LoginRequired(Exception):
    pass


@blueprint.before_request
async def _authenticate() -> None:
    g.ui_session = None
    g.ui_principal = None
    if request.endpoint == "ui.static":
        return
    found, stale = session.unpack(request.cookies.get(session.SESSION_COOKIE))
    if found is not None:
        principal = await _runtime().authenticator.authenticate(found.token)
        if principal is not None and principal.kind == "operator":
            g.ui_session = found
            g.ui_principal = principal
    if g.ui_principal is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if stale is not None:
            await _end_idle_session(stale)
        raise _LoginRequired
    if not await session.check_csrf():
        raise Forbidden("This request did not carry the page's CSRF token; reload the page and try again.")


@blueprint.after_request
async def _finish(response: Response) -> Response:
    if request.endpoint == "ui.static":
        return response
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    # an operator's own request slides the idle timeout; background refreshes (htmx polling, the
    # event stream) do not, or a page left open would never time out
    background = request.headers.get("HX-Request") == "true" or request.endpoint == "ui.task_events"
    if g.get("ui_session") is not None and not g.get("ui_logged_out") and not background:
        session.set_session(response, g.ui_session)
    if g.get("ui_pre_nonce") and request.cookies.get(session.PRE_COOKIE) != g.ui_pre_nonce:
        session.secure_cookie(response, session.PRE_COOKIE, g.ui_pre_nonce, max_age=3600)
    return response


async def _end_idle_session(token: str) -> None:
    """A genuine cookie left idle too long ends its session for good. Here, before any view, and
    not in the handler of `_LoginRequired`: an error raised by an error handler (the database out
    of reach) is answered 500, where the request's own hooks raise to the 503 handler."""
    principal = await _runtime().authenticator.authenticate(token)
    if principal is not None and principal.kind == "operator":
        await operators.logout(_db(), principal=principal)


@blueprint.errorhandler(_LoginRequired)
async def _login_required(_: _LoginRequired) -> Any:
    response: Any
    if request.headers.get("HX-Request") == "true":  # a background refresh: htmx loads the login page
        response = await make_response("", 401, {"HX-Redirect": url_for("ui.login")})
    elif request.method in session.SAFE_METHODS and not request.path.endswith("/events"):
        target = url_for("ui.login", next=request.full_path.rstrip("?"))
        response = redirect(target, 303)
    else:
        response = await make_response(
            await render_template(
                "error.html", status=401, title="Log in first", detail="Your session ended."
            ),
            401,
        )
    session.forget_cookie(response, session.SESSION_COOKIE)
    return response


@blueprint.errorhandler(AppError)
async def _app_error(error: AppError) -> Any:
    return await _error_page(error.status, error.title, error.detail, error.headers)


@blueprint.errorhandler(HTTPException)
async def _http_error(error: HTTPException) -> Any:
    return await _error_page(error.code or 500, error.name, error.description or "", {})


async def _error_page(
    status: int, title: str | None, detail: str | None, headers: dict[str, str] | None
) -> Any:
    body = await render_template("error.html", status=status, title=title, detail=detail)
    response = await make_response(body, status)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@blueprint.app_context_processor
def _template_context() -> dict[str, Any]:
    return {"csrf_token": session.csrf_token, "operator": g.get("ui_principal")}


@blueprint.app_template_filter("when")
def _when(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@blueprint.app_template_filter("pretty")
def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@blueprint.app_template_filter("seconds")
def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


# --- filters from the URL ------------------------------------------------------------------------


def _uuid_arg(name: str) -> UUID | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        return UUID(raw)
    except ValueError:
        raise Unprocessable(f"{name} must be a UUID.") from None


def _text_arg(name: str) -> str | None:
    raw = request.args.get(name, "").strip()
    if len(raw) > _TEXT_FILTER_MAX or not raw.isprintable():
        raise Unprocessable(f"{name} is too long or not printable.")
    return raw or None


def _cursor_arg() -> str | None:
    """A keyset page's cursor (longer than a text filter: a JSON sort key, app/src/api/pages.py)."""
    raw = request.args.get("cursor", "").strip()
    if len(raw) > _CURSOR_MAX or not raw.isprintable():
        raise Unprocessable("cursor is too long or not printable.")
    return raw or None


def _status_arg() -> str | None:
    raw = _text_arg("status")
    if raw is not None and raw not in {s.value for s in Status}:
        raise Unprocessable(f"Unknown status {raw!r}.")
    return raw


def _filters(*, status: str | None = None) -> dict[str, Any]:
    return {
        "client": _uuid_arg("client"),
        "queue": _text_arg("queue"),
        "kind": _text_arg("kind"),
        "status": status if status is not None else _status_arg(),
    }


def _query(values: dict[str, Any]) -> str:
    return urlencode({k: str(v) for k, v in values.items() if v not in (None, "")})


CONSOLE_PAGE = 100  # rows of a console list page (clients, keys, queues)


def _pager(cursor: str | None, next_cursor: str | None, **shown: Any) -> dict[str, str | None]:
    """The links of a keyset-paged console list: back to its first page, on to the next."""
    return {
        "next_url": f"?{_query({**shown, 'cursor': next_cursor})}" if next_cursor else None,
        "first_url": f"?{_query(shown)}" if cursor else None,
    }


async def _tenants() -> dict[UUID, str]:
    return await console.tenant_names(_db())


@blueprint.get("/static/<path:filename>")
async def static(filename: str) -> Any:
    """The console's own assets and the vendored ones (htmx, Swagger UI): public, cacheable."""
    response = await send_from_directory(STATIC_DIR, filename)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


# --- login ---------------------------------------------------------------------------------------


def _next_path() -> str:
    target = request.args.get("next", "")
    # only a path inside the console: never another host (open redirect), and only visible ASCII
    # (a line break or a tab cannot go into the Location header: a 500 after the login was spent)
    if _CONSOLE_PATH.fullmatch(target) and "\\" not in target:
        return target
    return url_for("ui.overview")


@blueprint.get("/login")
async def login() -> Any:
    if g.ui_principal is not None:
        return redirect(_next_path(), 303)
    return await render_template("login.html", next=_next_path(), error=None)


@blueprint.post("/login")
async def login_submit() -> Any:
    form = await request.form
    try:
        grant = await operators.login(
            _db(),
            email=form.get("email", "")[:254],
            password=form.get("password", "")[:1024],
            address=request.remote_addr or "unknown",
        )
    except AppError as error:
        body = await render_template("login.html", next=_next_path(), error=error.detail)
        return await make_response(body, error.status, error.headers)
    response = redirect(url_for("ui.totp", next=_next_path()), 303)
    session.set_mfa(response, grant.mfa_token)
    return response


@blueprint.get("/login/totp")
async def totp() -> Any:
    if not request.cookies.get(session.MFA_COOKIE):
        return redirect(url_for("ui.login"), 303)
    return await render_template("totp.html", next=_next_path(), error=None)


@blueprint.post("/login/totp")
async def totp_submit() -> Any:
    form = await request.form
    try:
        grant = await operators.login_totp(
            _db(),
            mfa_token=request.cookies.get(session.MFA_COOKIE, ""),
            code=form.get("code", "")[:64],
            address=request.remote_addr or "unknown",
        )
    except AppError as error:
        body = await render_template("totp.html", next=_next_path(), error=error.detail)
        return await make_response(body, error.status, error.headers)
    response = redirect(_next_path(), 303)
    session.set_session(
        response, session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp()))
    )
    session.forget_cookie(response, session.MFA_COOKIE)
    return response


@blueprint.post("/logout")
async def logout() -> Any:
    await operators.logout(_db(), principal=_principal())
    g.ui_logged_out = True
    response = redirect(url_for("ui.login"), 303)
    session.forget_cookie(response, session.SESSION_COOKIE)
    return response


# --- overview and queues -------------------------------------------------------------------------


@blueprint.get("/")
async def overview() -> Any:
    client = _uuid_arg("client")
    cursor = _cursor_arg()
    summaries, next_cursor = await console.overview(
        _db(), client_id=client, limit=CONSOLE_PAGE, cursor=cursor
    )
    charts = {s.queue.id: throughput_chart(s.series) for s in summaries}
    return await render_template(
        "overview.html",
        summaries=summaries,
        charts=charts,
        tenants=await _tenants(),
        client=client,
        **_pager(cursor, next_cursor, client=client),
    )


@blueprint.get("/queues/<int(max=9223372036854775807):queue_id>")
async def queue(queue_id: int) -> Any:
    summary = await console.queue(_db(), queue_id=queue_id)
    return await render_template(
        "queue.html",
        summary=summary,
        spark=throughput_chart(summary.series),
        tenants=await _tenants(),
        done=request.args.get("done"),
    )


@blueprint.post("/queues/<int(max=9223372036854775807):queue_id>/pause")
async def pause_queue(queue_id: int) -> Any:
    await console.set_queue_paused(_engine(), queue_id=queue_id, paused=True)
    return redirect(url_for("ui.queue", queue_id=queue_id, done="paused"), 303)


@blueprint.post("/queues/<int(max=9223372036854775807):queue_id>/resume")
async def resume_queue(queue_id: int) -> Any:
    await console.set_queue_paused(_engine(), queue_id=queue_id, paused=False)
    return redirect(url_for("ui.queue", queue_id=queue_id, done="resumed"), 303)


_LIMITS = ("max_concurrency", "rate_limit_per_s", "max_attempts", "min_backoff_s", "max_backoff_s")
_LIFTABLE = frozenset({"max_concurrency", "rate_limit_per_s"})  # empty means no limit


@blueprint.post("/queues/<int(max=9223372036854775807):queue_id>/limits")
async def set_queue_limits(queue_id: int) -> Any:
    form = await request.form
    changes: dict[str, Any] = {}
    for name in _LIMITS:
        raw = form.get(name, "").strip()
        if raw or name in _LIFTABLE:
            changes[name] = raw or None
    try:
        data = QueueIn.model_validate(changes)
    except ValidationError as exc:
        errors = field_errors(exc.errors(include_url=False, include_input=False))
        raise Unprocessable(
            "Check the limits: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        ) from None
    await console.set_queue_limits(_engine(), queue_id=queue_id, data=data)
    return redirect(url_for("ui.queue", queue_id=queue_id, done="limits saved"), 303)


@blueprint.get("/queues/<int(max=9223372036854775807):queue_id>/purge")
async def confirm_purge(queue_id: int) -> Any:
    summary = await console.queue(_db(), queue_id=queue_id)
    return await render_template(
        "confirm.html",
        title=f"Purge queue {summary.queue.name}",
        question=f"Delete {summary.purgeable} tasks that have not started from queue "
        f"{summary.queue.name!r}? Running tasks finish; this cannot be undone.",
        action=url_for("ui.purge_queue", queue_id=queue_id),
        button=f"Purge {summary.purgeable} tasks",
        back=url_for("ui.queue", queue_id=queue_id),
        danger=True,
    )


@blueprint.post("/queues/<int(max=9223372036854775807):queue_id>/purge")
async def purge_queue(queue_id: int) -> Any:
    purged = await console.purge_queue(_db(), queue_id=queue_id)
    return redirect(url_for("ui.queue", queue_id=queue_id, done=f"purged {purged} tasks"), 303)


# --- tasks ---------------------------------------------------------------------------------------


async def _task_list(template: str, *, status: str | None = None) -> Any:
    filters = _filters(status=status)
    cursor = _text_arg("cursor")
    items, next_cursor = await console.list_tasks(
        _db(),
        client_id=filters["client"],
        queue=filters["queue"],
        status=filters["status"],
        kind=filters["kind"],
        limit=PAGE_SIZE,
        cursor=cursor,
    )
    shown = {k: v for k, v in filters.items() if k != "status" or status is None}
    return await render_template(
        template,
        items=items,
        filters=filters,
        statuses=[s.value for s in Status],
        tenants=await _tenants(),
        next_url=f"?{_query({**shown, 'cursor': next_cursor})}" if next_cursor else None,
        first_url=f"?{_query(shown)}" if cursor else None,
        bulk_query=_query(filters),
        done=request.args.get("done"),
    )


@blueprint.get("/tasks")
async def task_list() -> Any:
    return await _task_list("tasks.html")


@blueprint.get("/dead-letters")
async def dead_letters() -> Any:
    return await _task_list("dead_letters.html", status=Status.DISCARDED.value)


@blueprint.get("/tasks/<uuid:task_id>")
async def task(task_id: UUID) -> Any:
    found, attempts = await console.task_with_attempts(_db(), task_id=task_id)
    return await render_template(
        "task.html",
        task=found,
        attempts=attempts,
        blocked_by=await flow.blocked_by(_db(), found),
        composition=await console.composition(_db(), task=found),
        terminal=Status(found.status) in TERMINAL,
        retryable=found.status in (Status.DISCARDED, Status.CANCELLED),
        tenants=await _tenants(),
        done=request.args.get("done"),
    )


@blueprint.post("/tasks/<uuid:task_id>/retry")
async def retry_task(task_id: UUID) -> Any:
    await console.retry_task(_engine(), task_id=task_id)
    return redirect(url_for("ui.task", task_id=task_id, done="retried"), 303)


@blueprint.post("/tasks/<uuid:task_id>/cancel")
async def cancel_task(task_id: UUID) -> Any:
    await console.cancel_task(_db(), task_id=task_id)
    return redirect(url_for("ui.task", task_id=task_id, done="cancel requested"), 303)


@blueprint.post("/tasks/<uuid:task_id>/signal")
async def signal_task(task_id: UUID) -> Any:
    """Send a signal (what POST /api/tasks/{id}/signals/{name} does, for the task's own client)."""
    found = await console.task(_db(), task_id=task_id)
    form = await request.form
    name = tasks.signal_name(form.get("name", "").strip(), field="form.name")
    raw = form.get("data", "").strip()
    try:
        data = json_provider.loads(raw, max_depth=_runtime().settings.SERVER_MAX_JSON_DEPTH) if raw else None
    except ValueError:
        raise Unprocessable(
            "The signal's data must be JSON (or empty).",
            errors=[{"field": "form.data", "message": "not JSON", "type": "json_invalid"}],
        ) from None
    await tasks.signal(_db(), client_id=found.client_id, task_id=task_id, name=name, data=data)
    return redirect(url_for("ui.task", task_id=task_id, done=f"signal {name} sent"), 303)


@blueprint.get("/tasks/<uuid:task_id>/events")
async def task_events(task_id: UUID) -> Any:
    """The task's events (the events service behind GET /api/tasks/{id}/events) for this page."""
    found = await console.task(_db(), task_id=task_id)
    runtime = _runtime()
    if runtime.notifier is None:
        raise AppError("Live events are not available yet.", status=503)
    stopping = runtime.shutting_down
    stream_of = tasks.events(
        _db(),
        runtime.notifier,
        client_id=found.client_id,
        task_id=task_id,
        stopping=stopping,
        last_event_id=request.headers.get("Last-Event-ID"),  # EventSource's reconnect resumes
    )
    browser: session.BrowserSession = g.ui_session

    async def allowed() -> bool:
        """The page's session still holds: not idle too long (the stream does not slide it), not
        past its end, not logged out."""
        if time.time() >= browser.ends_at():
            return False
        principal = await runtime.authenticator.identify(browser.token)
        return principal is not None and principal.kind == "operator"

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for frame in sse.frames(stream_of, allowed=allowed):
                yield frame
        except StorageUnavailable as error:
            # the page reconnects after the `retry` it names, as after a stopping server's
            log.warning("event stream ended: database unavailable", error=str(error))
            yield sse.unavailable_event(error.retry_after_s)
            return
        if stopping.is_set():
            # not the task's end: the page reconnects (to another replica) and follows on
            yield sse.shutdown_event(SHUTDOWN_RETRY_AFTER_S)
        else:
            yield b"event: end\ndata: {}\n\n"

    response = await make_response(
        stream(), 200, {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    response.timeout = None  # type: ignore[union-attr]
    return response


_BULK_ACTIONS = {"retry": "Retry", "cancel": "Cancel"}


def _bulk_filter() -> tuple[bulk.TaskFilter, dict[str, Any]]:
    filters = _filters()
    where = bulk.TaskFilter(
        client_id=filters["client"], queue=filters["queue"], kind=filters["kind"], status=filters["status"]
    )
    return where, filters


@blueprint.get("/tasks/bulk/<action>")
async def confirm_bulk(action: str) -> Any:
    if action not in _BULK_ACTIONS:
        raise AppError("No such action.", status=404)
    where, filters = _bulk_filter()
    count = await bulk.count(_db(), where=where, action=action)
    tenants = await _tenants()
    scope = ", ".join(
        f"{name} {tenants.get(value, value) if name == 'client' else value}"
        for name, value in filters.items()
        if value is not None
    )
    verb = _BULK_ACTIONS[action]
    return await render_template(
        "confirm.html",
        title=f"{verb} tasks in bulk",
        question=f"{verb} {count} tasks matching {scope or 'no filter (every tenant)'}?",
        action=url_for("ui.run_bulk", action=action) + "?" + _query(filters),
        button=f"{verb} {count} tasks",
        back=(url_for("ui.dead_letters") if filters["status"] == "discarded" else url_for("ui.task_list"))
        + "?"
        + _query(filters),
        danger=action == "cancel",
    )


@blueprint.post("/tasks/bulk/<action>")
async def run_bulk(action: str) -> Any:
    if action not in _BULK_ACTIONS:
        raise AppError("No such action.", status=404)
    where, filters = _bulk_filter()
    if action == "retry":
        count = await bulk.retry(_engine(), where=where)
    else:
        count = await bulk.cancel(_db(), where=where)
    page = "ui.dead_letters" if filters["status"] == "discarded" else "ui.task_list"
    kept = {k: v for k, v in filters.items() if k != "status" or page == "ui.task_list"}
    done = f"{'retried' if action == 'retry' else 'cancelled'} {count} tasks"
    return redirect(url_for(page) + "?" + _query({**kept, "done": done}), 303)


# --- schedules -----------------------------------------------------------------------------------


@blueprint.get("/schedules")
async def schedule_list() -> Any:
    client = _uuid_arg("client")
    items = await console.list_schedules(_db(), client_id=client)
    return await render_template(
        "schedules.html", items=items, client=client, tenants=await _tenants(), done=request.args.get("done")
    )


@blueprint.post("/schedules/<uuid:schedule_id>/<any(pause, resume):action>")
async def pause_schedule(schedule_id: UUID, action: str) -> Any:
    await console.set_schedule_paused(_engine(), schedule_id=schedule_id, paused=action == "pause")
    return redirect(url_for("ui.schedule_list", done=f"{action}d"), 303)


@blueprint.post("/schedules/<uuid:schedule_id>/trigger")
async def trigger_schedule(schedule_id: UUID) -> Any:
    made = await console.trigger_schedule(_engine(), schedule_id=schedule_id)
    return redirect(url_for("ui.task", task_id=made.id, done="triggered"), 303)


# --- clients, keys, signing secrets --------------------------------------------------------------


@blueprint.get("/clients")
async def client_list() -> Any:
    cursor = _cursor_arg()
    items, next_cursor = await clients.list_clients(
        _db(), principal=_principal(), limit=CONSOLE_PAGE, cursor=cursor
    )
    return await render_template(
        "clients.html", items=items, scopes=SCOPES, created=None, **_pager(cursor, next_cursor)
    )


@blueprint.post("/clients")
async def create_client() -> Any:
    form = await request.form
    chosen = [scope for scope in form.getlist("scopes") if scope in SCOPES]
    if not chosen:
        raise Unprocessable("Choose at least one scope.")
    client, key = await clients.create_client(
        _db(), name=form.get("name", "")[:100], scopes=chosen, created_by=_principal().operator_id
    )
    items, next_cursor = await clients.list_clients(
        _db(), principal=_principal(), limit=CONSOLE_PAGE, cursor=None
    )
    return await render_template(
        "clients.html", items=items, scopes=SCOPES, created=(client, key), **_pager(None, next_cursor)
    )


async def _client_page(client_id: UUID, *, new_key: str | None = None, done: str | None = None) -> Any:
    principal = _principal()
    found = await clients.get_client(_db(), principal=principal, client_id=client_id)
    # the newest keys (a client may have any number; GET /api/auth/clients/{id}/keys pages them all)
    keys, _ = await clients.list_keys(
        _db(), principal=principal, client_id=client_id, limit=CONSOLE_PAGE, cursor=None
    )
    secrets = await clients.list_signing_secrets(_db(), principal=principal, client_id=client_id)
    return await render_template(
        "client.html",
        client=found,
        keys=keys,
        secrets=secrets,
        new_key=new_key,
        done=done or request.args.get("done"),
    )


@blueprint.get("/clients/<uuid:client_id>")
async def client(client_id: UUID) -> Any:
    return await _client_page(client_id)


@blueprint.post("/clients/<uuid:client_id>/keys")
async def create_key(client_id: UUID) -> Any:
    key = await clients.issue_key(_db(), principal=_principal(), client_id=client_id)
    return await _client_page(client_id, new_key=key.api_key)


@blueprint.post("/clients/<uuid:client_id>/keys/<uuid:key_id>/revoke")
async def revoke_key(client_id: UUID, key_id: UUID) -> Any:
    await clients.revoke_key(_db(), principal=_principal(), client_id=client_id, key_id=key_id)
    return redirect(url_for("ui.client", client_id=client_id, done="key revoked"), 303)


@blueprint.post("/clients/<uuid:client_id>/signing-secrets")
async def rotate_signing_secret(client_id: UUID) -> Any:
    await clients.add_signing_secret(_db(), principal=_principal(), client_id=client_id)
    return redirect(url_for("ui.client", client_id=client_id, done="signing secret added"), 303)


@blueprint.post("/clients/<uuid:client_id>/signing-secrets/<uuid:secret_id>/delete")
async def delete_signing_secret(client_id: UUID, secret_id: UUID) -> Any:
    await clients.delete_signing_secret(
        _db(), principal=_principal(), client_id=client_id, secret_id=secret_id
    )
    return redirect(url_for("ui.client", client_id=client_id, done="signing secret deleted"), 303)


@blueprint.post("/clients/<uuid:client_id>/<any(disable, enable):action>")
async def toggle_client(client_id: UUID, action: str) -> Any:
    await clients.set_disabled(
        _db(), principal=_principal(), client_id=client_id, disabled=action == "disable"
    )
    return redirect(url_for("ui.client", client_id=client_id, done=f"client {action}d"), 303)


# --- workers and hosts ---------------------------------------------------------------------------


@blueprint.get("/workers")
async def worker_list() -> Any:
    client = _uuid_arg("client")
    items = await console.list_workers(_db(), client_id=client)
    return await render_template("workers.html", items=items, client=client, tenants=await _tenants())


@blueprint.get("/hosts")
async def host_list() -> Any:
    """The destinations of `http` tasks as GET /api/hosts shows them (the same service)."""
    client = _uuid_arg("client")
    items, _ = await flow.task_hosts(_db(), client_id=client, limit=CONSOLE_HOSTS)
    return await render_template(
        "hosts.html",
        items=items,
        client=client,
        tenants=await _tenants(),
        max_concurrency=_db().settings.HTTP_HOST_MAX_CONCURRENCY,
    )


@hide
async def root() -> Any:
    """`/`: the console (registered without the /ui prefix by the routes adapter)."""
    return redirect(url_for("ui.overview"), 302)


@hide
async def favicon() -> Any:
    """`/favicon.ico`, which browsers ask for on pages without an icon link (/docs)."""
    return redirect(url_for("ui.static", filename="favicon.svg"), 301)


def _hide_from_openapi(state: Any) -> None:
    """The console is HTML for browsers, not API: none of its routes belong in /openapi.json.
    (Recorded last, so it runs after every route above has been added to the app.)"""
    for endpoint, view in state.app.view_functions.items():
        if endpoint.startswith(f"{blueprint.name}."):
            hide(view)


blueprint.record(_hide_from_openapi)
