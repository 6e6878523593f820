"""The operator console over the Quart test client: who may see it, cookies, CSRF, CSP, tenancy."""

from __future__ import annotations

import re
import time
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from uuid import UUID

from quart import Quart
from quart.typing import TestClientProtocol as Client

from app.database import Database
from app.src.api.auth import operators
from app.src.api.models.auth import IssuedKey, NewOperator
from app.ui import session
from app.ui.views import CONTENT_SECURITY_POLICY
from tests.conftest import OPERATOR_PASSWORD, bearer
from tests.integration.auth.login_steps import code
from tests.task_harness import enqueue, eventually, fetch

TEMPLATES = Path(__file__).resolve().parents[3] / "app" / "ui" / "templates"
_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


class Browser:
    """A test client that keeps the console's cookies the way a browser over HTTPS would."""

    def __init__(self, app: Quart) -> None:
        self.client = app.test_client(use_cookies=False)
        self.cookies: dict[str, str] = {}
        self.last_set_cookie: dict[str, str] = {}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    def _keep(self, response: Any) -> None:
        for raw in response.headers.getlist("Set-Cookie"):
            parsed: SimpleCookie = SimpleCookie()
            parsed.load(raw)
            for name, morsel in parsed.items():
                self.last_set_cookie[name] = raw
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        response = await self.client.get(path, headers=self._headers(headers), scheme="https")
        self._keep(response)
        return response

    async def post(
        self, path: str, form: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any:
        response = await self.client.post(
            path, form=form or {}, headers=self._headers(headers), scheme="https"
        )
        self._keep(response)
        return response

    async def csrf(self, path: str) -> str:
        page = await (await self.get(path)).get_data(as_text=True)
        match = _CSRF.search(page)
        assert match, page
        return match.group(1)


async def log_in(browser: Browser, operator: NewOperator) -> None:
    token = await browser.csrf("/ui/login")
    response = await browser.post(
        "/ui/login", {"email": operator.email, "password": OPERATOR_PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 303, await response.get_data(as_text=True)
    assert response.headers["Location"].startswith("/ui/login/totp")
    token = await browser.csrf("/ui/login/totp")
    response = await browser.post("/ui/login/totp", {"code": code(operator.totp_secret), "csrf_token": token})
    assert response.status_code == 303, await response.get_data(as_text=True)
    assert session.SESSION_COOKIE in browser.cookies


async def logged_in(app: Quart, db: Database, operator: NewOperator) -> Browser:
    """A browser holding a session cookie of a fresh session (TOTP codes are single-use, so a
    test logs in through the form once and takes further sessions as proven)."""
    grant = await operators.start_session(db, user_id=operator.user_id)
    browser = Browser(app)
    async with app.app_context():
        browser.cookies[session.SESSION_COOKIE] = session.pack(
            session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp()))
        )
    return browser


async def test_every_page_and_action_needs_an_operator_session(
    app: Quart, auth_headers: dict[str, str]
) -> None:
    browser = Browser(app)
    for path in ("/ui/", "/ui/tasks", "/ui/dead-letters", "/ui/schedules", "/ui/clients", "/ui/queues/1"):
        response = await browser.get(path)
        assert response.status_code == 303, path
        assert response.headers["Location"].startswith("/ui/login?next=")
        # an API key is not a console session
        response = await browser.get(path, headers=auth_headers)
        assert response.status_code == 303, path
    response = await browser.post("/ui/queues/1/pause")
    assert response.status_code == 401
    forged = {session.SESSION_COOKIE: "tgs_forged.9999999999.9999999999.00"}
    browser.cookies.update(forged)
    assert (await browser.get("/ui/")).status_code == 303


async def test_login_sets_a_strict_secure_httponly_cookie_and_logout_ends_the_session(
    app: Quart, operator: NewOperator
) -> None:
    browser = Browser(app)
    await log_in(browser, operator)
    raw = browser.last_set_cookie[session.SESSION_COOKIE].lower()
    for flag in ("httponly", "secure", "samesite=strict", "path=/ui"):
        assert flag in raw, raw
    max_age = int(re.search(r"max-age=(\d+)", raw).group(1))  # type: ignore[union-attr]
    assert operators.SESSION_TTL_S - 60 < max_age <= operators.SESSION_TTL_S
    assert "mfa" not in " ".join(browser.cookies)  # the MFA cookie is gone
    page = await browser.get("/ui/")
    assert page.status_code == 200
    assert "Queues" in await page.get_data(as_text=True)

    token = await browser.csrf("/ui/")
    kept = dict(browser.cookies)
    assert (await browser.post("/ui/logout", {"csrf_token": token})).status_code == 303
    browser.cookies = kept  # replaying the old cookie does not help: the session is revoked
    assert (await browser.get("/ui/")).status_code == 303


async def test_login_answers_alike_for_unknown_accounts_and_wrong_passwords(
    app: Quart, operator: NewOperator
) -> None:
    answers = []
    for email, password in (
        (operator.email, "not the password at all"),
        ("nobody@example.com", "whatever1234"),
    ):
        browser = Browser(app)
        token = await browser.csrf("/ui/login")
        response = await browser.post(
            "/ui/login", {"email": email, "password": password, "csrf_token": token}
        )
        body = await response.get_data(as_text=True)
        answers.append(
            (response.status_code, operators.WRONG_CREDENTIALS in body, "tg_mfa" in browser.cookies)
        )
    assert answers == [(401, True, False), (401, True, False)]


async def test_login_without_the_login_forms_csrf_token_is_refused(app: Quart, operator: NewOperator) -> None:
    browser = Browser(app)
    await browser.csrf("/ui/login")
    response = await browser.post("/ui/login", {"email": operator.email, "password": OPERATOR_PASSWORD})
    assert response.status_code == 403
    assert "tg_mfa" not in browser.cookies


async def test_a_next_with_a_line_break_logs_in_to_the_overview_not_a_500(
    app: Quart, db: Database, operator: NewOperator
) -> None:
    """A login link whose `next` held a line break (`%0d%0a`) answered 500 at the TOTP step,
    after the code was spent and the session made (a header value cannot hold one): anyone could
    send an operator such a link. A `next` that is not a plain console path goes to the overview."""
    for bad in ("/ui/%0d%0aSet-Cookie:%20x=y", "/ui/tasks%09x", "/ui/%C3%A9"):
        browser = Browser(app)
        login = f"/ui/login?next={bad}"
        token = await browser.csrf(login)
        response = await browser.post(
            login, {"email": operator.email, "password": OPERATOR_PASSWORD, "csrf_token": token}
        )
        assert response.status_code == 303, bad
        step = response.headers["Location"]
        token = await browser.csrf(step)
        response = await browser.post(step, {"code": code(operator.totp_secret), "csrf_token": token})
        assert response.status_code == 303, (bad, await response.get_data(as_text=True))
        assert response.headers["Location"] == "/ui/", bad
        assert (await browser.get("/ui/")).status_code == 200
        async with db.driver() as conn:  # codes are single-use: let the next login take one again
            await conn.execute("UPDATE users SET totp_last_step = 0 WHERE id = $1", operator.user_id)


async def test_state_changes_need_the_sessions_csrf_token(
    app: Quart,
    db: Database,
    client: Client,
    operator: NewOperator,
    auth_headers: dict[str, str],
    clean_database: str,
) -> None:
    await enqueue(client, auth_headers, kind="noop", queue="reports")
    [row] = await fetch(clean_database, "SELECT id FROM queues WHERE name = 'reports'")
    browser = Browser(app)
    await log_in(browser, operator)
    path = f"/ui/queues/{row['id']}/pause"

    assert (await browser.post(path)).status_code == 403
    assert (await browser.post(path, {"csrf_token": "0" * 64})).status_code == 403
    other = await logged_in(app, db, operator)
    stolen = await other.csrf("/ui/")  # another session's token is not this one's
    assert (await browser.post(path, {"csrf_token": stolen})).status_code == 403
    [queue] = await fetch(clean_database, "SELECT paused FROM queues WHERE id = $1", row["id"])
    assert queue["paused"] is False

    token = await browser.csrf(f"/ui/queues/{row['id']}")
    assert (await browser.post(path, headers={"X-CSRF-Token": token})).status_code == 303
    [queue] = await fetch(clean_database, "SELECT paused FROM queues WHERE id = $1", row["id"])
    assert queue["paused"] is True


async def test_a_non_ascii_csrf_token_or_session_cookie_is_refused_not_a_500(
    app: Quart, db: Database, operator: NewOperator, clean_database: str
) -> None:
    browser = await logged_in(app, db, operator)
    assert (await browser.post("/ui/logout", headers={"X-CSRF-Token": "é"})).status_code == 403
    assert (await browser.post("/ui/logout", {"csrf_token": "é中"})).status_code == 403
    assert (await browser.get("/ui/")).status_code == 200  # neither ended the session
    # a cookie no server signed, with a non-ASCII signature: the login page, not a 500
    mangled = Browser(app)
    mangled.cookies[session.SESSION_COOKIE] = "tgs_x.1.2.é"
    response = await mangled.get("/ui/")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/ui/login")
    assert (await mangled.get("/ui/login")).status_code == 200


async def test_pages_carry_a_csp_without_inline_script_and_templates_have_no_inline_code(
    app: Quart, operator: NewOperator
) -> None:
    browser = Browser(app)
    for response in (await browser.get("/ui/login"),):
        csp = response.headers["Content-Security-Policy"]
        assert csp == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
    await log_in(browser, operator)
    assert (await browser.get("/ui/")).headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\sstyle=|<style|\son[a-z]+=|hx-on", text), template.name
        assert "http://" not in text, template.name  # nothing from elsewhere
        assert "https://" not in text, template.name


async def test_a_session_left_idle_is_refused_and_revoked(
    app: Quart, db: Database, operator: NewOperator
) -> None:
    grant = await operators.start_session(db, user_id=operator.user_id)
    browser = Browser(app)
    async with app.app_context():
        idle = session.pack(
            session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp())),
            now=time.time() - session.IDLE_TIMEOUT_S - 5,
        )
        fresh = session.pack(session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp())))
    browser.cookies[session.SESSION_COOKIE] = fresh
    assert (await browser.get("/ui/")).status_code == 200
    browser.cookies[session.SESSION_COOKIE] = idle
    assert (await browser.get("/ui/")).status_code == 303
    browser.cookies[session.SESSION_COOKIE] = fresh  # its session was ended, not only this cookie
    assert (await browser.get("/ui/")).status_code == 303
    response = await app.test_client().get("/api/auth/me", headers=bearer(grant.access_token))
    assert response.status_code == 401


async def test_operators_see_every_tenant_and_filter_by_client(
    app: Quart,
    client: Client,
    operator: NewOperator,
    api_client: IssuedKey,
    other_client: IssuedKey,
    auth_headers: dict[str, str],
    other_client_headers: dict[str, str],
    operator_headers: dict[str, str],
) -> None:
    mine = await enqueue(client, auth_headers, kind="noop", queue="mine")
    theirs = await enqueue(client, other_client_headers, kind="noop", queue="theirs")
    browser = Browser(app)
    await log_in(browser, operator)
    everything = await (await browser.get("/ui/tasks")).get_data(as_text=True)
    assert mine["id"][:13] in everything
    assert theirs["id"][:13] in everything
    only = await (await browser.get(f"/ui/tasks?client={other_client.client_id}")).get_data(as_text=True)
    assert theirs["id"][:13] in only
    assert mine["id"][:13] not in only
    overview = await (await browser.get(f"/ui/?client={api_client.client_id}")).get_data(as_text=True)
    assert ">mine<" in overview
    assert ">theirs<" not in overview
    assert (await browser.get(f"/ui/tasks/{theirs['id']}")).status_code == 200

    # the API gains the same filter for operator sessions ...
    response = await client.get(f"/api/tasks?client_id={other_client.client_id}", headers=operator_headers)
    assert [t["id"] for t in (await response.get_json())["items"]] == [theirs["id"]]
    response = await client.get(f"/api/queues?client_id={api_client.client_id}", headers=operator_headers)
    assert "mine" in [q["name"] for q in (await response.get_json())["items"]]
    # ... and only for them: an API key cannot read another tenant by naming it
    response = await client.get(f"/api/tasks?client_id={other_client.client_id}", headers=auth_headers)
    assert response.status_code == 403
    response = await client.get(f"/api/tasks?client_id={api_client.client_id}", headers=auth_headers)
    assert [t["id"] for t in (await response.get_json())["items"]] == [mine["id"]]


async def test_bulk_retry_of_dead_letters_names_the_count_and_keeps_to_the_filter(
    app: Quart,
    client: Client,
    operator: NewOperator,
    other_client: IssuedKey,
    auth_headers: dict[str, str],
    other_client_headers: dict[str, str],
    clean_database: str,
) -> None:
    ids = [(await enqueue(client, auth_headers, kind="noop"))["id"] for _ in range(3)]
    ids += [(await enqueue(client, other_client_headers, kind="noop"))["id"] for _ in range(2)]
    await fetch(
        clean_database,
        "UPDATE tasks SET status = 'discarded', finished_at = now(), last_error = 'boom' WHERE id = ANY($1)",
        [UUID(i) for i in ids],
    )
    browser = Browser(app)
    await log_in(browser, operator)
    query = f"client={other_client.client_id}&status=discarded"
    confirm = await (await browser.get(f"/ui/tasks/bulk/retry?{query}")).get_data(as_text=True)
    assert "Retry 2 tasks" in confirm
    token = _CSRF.search(confirm).group(1)  # type: ignore[union-attr]
    response = await browser.post(f"/ui/tasks/bulk/retry?{query}", {"csrf_token": token})
    assert response.status_code == 303
    assert "retried+2+tasks" in response.headers["Location"]
    rows = await fetch(clean_database, "SELECT client_id, status FROM tasks ORDER BY client_id")
    by_status = sorted((str(r["client_id"]) == str(other_client.client_id), r["status"]) for r in rows)
    assert by_status == [(False, "discarded")] * 3 + [(True, "available")] * 2


async def test_docs_use_the_vendored_swagger_ui(client: Client) -> None:
    page = await (await client.get("/docs")).get_data(as_text=True)
    assert "cdn" not in page.lower()
    for url in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert url.startswith("/ui/static/vendor/"), url
        assert (await client.get(url)).status_code == 200


async def test_background_refreshes_do_not_keep_an_idle_session_alive(
    app: Quart, db: Database, operator: NewOperator
) -> None:
    browser = await logged_in(app, db, operator)
    browser.last_set_cookie.clear()
    assert (await browser.get("/ui/", headers={"HX-Request": "true"})).status_code == 200
    assert session.SESSION_COOKIE not in browser.last_set_cookie  # polling does not slide it
    assert (await browser.get("/ui/")).status_code == 200
    assert session.SESSION_COOKIE in browser.last_set_cookie  # the operator's own request does
    logged_out = Browser(app)
    response = await logged_out.get("/ui/", headers={"HX-Request": "true"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/ui/login"


async def test_queue_limits_are_set_and_lifted_from_the_queue_page(
    app: Quart,
    db: Database,
    client: Client,
    operator: NewOperator,
    auth_headers: dict[str, str],
    clean_database: str,
) -> None:
    await enqueue(client, auth_headers, kind="noop", queue="limited")
    [row] = await fetch(clean_database, "SELECT id FROM queues WHERE name = 'limited'")
    browser = await logged_in(app, db, operator)
    path = f"/ui/queues/{row['id']}"
    token = await browser.csrf(path)
    form = {"csrf_token": token, "max_concurrency": "3", "rate_limit_per_s": "2.5", "max_attempts": "7",
            "min_backoff_s": "1", "max_backoff_s": "60"}  # fmt: skip
    assert (await browser.post(f"{path}/limits", form)).status_code == 303
    [queue] = await fetch(clean_database, "SELECT * FROM queues WHERE id = $1", row["id"])
    assert (queue["max_concurrency"], queue["rate_limit_per_s"], queue["max_attempts"]) == (3, 2.5, 7)
    lifted = {**form, "max_concurrency": "", "rate_limit_per_s": ""}
    assert (await browser.post(f"{path}/limits", lifted)).status_code == 303
    [queue] = await fetch(clean_database, "SELECT * FROM queues WHERE id = $1", row["id"])
    assert (queue["max_concurrency"], queue["rate_limit_per_s"]) == (None, None)
    response = await browser.post(f"{path}/limits", {**form, "max_attempts": "0"})
    assert response.status_code == 422
    assert "max_attempts" in await response.get_data(as_text=True)


async def test_every_console_route_but_the_login_needs_a_session(app: Quart) -> None:
    """Meta-test: walk the URL map, so a route added later cannot forget the session check."""
    from app.ui.views import PUBLIC_ENDPOINTS

    samples = {"integer": "1", "uuid": "00000000-0000-7000-8000-000000000000"}
    browser = Browser(app)
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/ui/") or rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        values = {}
        for name, converter in rule._converters.items():
            kind = type(converter).__name__.removesuffix("Converter").lower()
            options = getattr(converter, "items", None)
            values[name] = sorted(options)[0] if options else samples.get(kind, "x")
        path = rule.build(values)[1]  # type: ignore[index]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = await (browser.get(path) if method == "GET" else browser.post(path))
            expected = (303,) if method == "GET" and not path.endswith("/events") else (401,)
            assert response.status_code in expected, (method, path, response.status_code)
            checked += 1
    assert checked > 25


async def test_the_workers_page_lists_the_workers_seen_lately(
    serving: Any, operator: NewOperator, auth_headers: dict[str, str], db: Database
) -> None:
    app = await serving(ROLES=["api", "worker"])
    task = await enqueue(app.test_client(), auth_headers, kind="sleep", payload={"seconds": 0.5})
    browser = await logged_in(app, db, operator)

    async def listed() -> bool:
        page = await (await browser.get("/ui/workers")).get_data(as_text=True)
        return "in-process" in page and "every client" in page

    await eventually(listed, timeout=15)
    assert task["id"]


async def test_the_hosts_page_shows_each_destinations_adaptive_limit(
    app: Quart, operator: NewOperator, db: Database, api_client: IssuedKey, clean_database: str
) -> None:
    # one host halved after a 429 and now cooling down, one healthy with a request in flight
    await fetch(
        clean_database,
        "INSERT INTO http_hosts (host, concurrency_limit, consecutive_failures, "
        "opened_until, window_requests, window_failures) VALUES "
        "('api.example:443', 5, 5, now() + interval '1 minute', 4, 1)",
    )
    await fetch(
        clean_database,
        "INSERT INTO http_host_permits (host, slot, holder, expires_at) "
        "VALUES ('hooks.example:443', 1, gen_random_uuid(), now() + interval '1 minute')",
    )
    await fetch(
        clean_database,
        "INSERT INTO http_host_clients (host, client_id) VALUES ('api.example:443', $1)",
        api_client.client_id,
    )
    browser = await logged_in(app, db, operator)
    page = await (await browser.get("/ui/hosts")).get_data(as_text=True)
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r'<th scope="row" class="mono">([^<]+)</th>(.*?)</tr>', page, re.S)
    }
    assert set(rows) == {"api.example:443", "hooks.example:443"}
    assert re.search(r">5 <span class=\"muted\">of 10</span>", rows["api.example:443"])
    assert ">open<" in rows["api.example:443"]
    assert "25%" in rows["api.example:443"]
    assert ">1</td>" in rows["hooks.example:443"]
    assert ">closed<" in rows["hooks.example:443"]
    # the client filter: the hosts that client's tasks called
    mine = await (await browser.get(f"/ui/hosts?client={api_client.client_id}")).get_data(as_text=True)
    assert "api.example:443" in mine
    assert "hooks.example:443" not in mine


async def test_a_task_page_says_why_the_task_waits(
    app: Quart, operator: NewOperator, db: Database, auth_headers: dict[str, str]
) -> None:
    client = app.test_client()
    await client.put("/api/queues/held", json={"paused": True}, headers=auth_headers)
    task = await enqueue(client, auth_headers, kind="noop", queue="held", concurrency_key="acct-3")
    browser = await logged_in(app, db, operator)
    page = await (await browser.get(f"/ui/tasks/{task['id']}")).get_data(as_text=True)
    assert "Why it waits" in page
    assert "queue_paused" in page
    assert "acct-3" in page


async def test_a_queue_id_beyond_bigint_is_404_not_500(
    app: Quart, db: Database, operator: NewOperator
) -> None:
    browser = await logged_in(app, db, operator)
    for path in ("/ui/queues/99999999999999999999999", "/ui/queues/99999999999999999999999/purge"):
        assert (await browser.get(path)).status_code == 404, path


async def test_the_task_pages_event_stream_ends_at_shutdown_and_says_reconnect(
    app: Quart, db: Database, operator: NewOperator, auth_headers: dict[str, str]
) -> None:
    import asyncio

    browser = await logged_in(app, db, operator)
    task = await enqueue(app.test_client(), auth_headers, kind="noop", delay_s=600)
    stream = asyncio.create_task(browser.get(f"/ui/tasks/{task['id']}/events"))
    await asyncio.sleep(0.3)
    assert not stream.done()
    app.extensions["taskgate"].shutting_down.set()
    response = await asyncio.wait_for(stream, timeout=5)
    body = await response.get_data()
    assert body.endswith(b'event: shutdown\ndata: {"retry_after_s": 1}\n\n'), body
    assert b"event: end" not in body  # the task did not end: the page reconnects and follows on


async def test_the_task_pages_event_stream_ends_with_its_session(
    app: Quart, db: Database, operator: NewOperator, auth_headers: dict[str, str]
) -> None:
    """The stream does not slide the idle timeout, and once outlived its session: logged out, or
    left idle past IDLE_TIMEOUT_S, a page kept receiving the task's changes until the task ended."""
    import asyncio

    from app.src.utils import sse

    api = app.test_client()
    task = await enqueue(api, auth_headers, kind="noop", delay_s=600)
    events = f"/ui/tasks/{task['id']}/events"
    logged_out = await logged_in(app, db, operator)
    grant = await operators.start_session(db, user_id=operator.user_id)
    idle = Browser(app)
    async with app.app_context():  # its last use was IDLE_TIMEOUT_S ago, less a second
        idle.cookies[session.SESSION_COOKIE] = session.pack(
            session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp())),
            now=time.time() - session.IDLE_TIMEOUT_S + 1,
        )
    streams = [asyncio.create_task(browser.get(events)) for browser in (logged_out, idle)]
    await asyncio.sleep(0.3)
    assert not any(stream.done() for stream in streams)
    token = await logged_out.csrf("/ui/")
    assert (await logged_out.post("/ui/logout", {"csrf_token": token})).status_code == 303
    await asyncio.sleep(sse.RECHECK_ALLOWED_S + 1)
    assert (await api.post(f"/api/tasks/{task['id']}/cancel", headers=auth_headers)).status_code == 200
    for stream in streams:
        body = await (await asyncio.wait_for(stream, timeout=10)).get_data(as_text=True)
        assert '"status": "scheduled"' in body
        assert "cancelled" not in body


async def test_rotating_secret_keys_keeps_console_sessions_and_their_csrf_tokens(
    serving: Any, db: Database, operator: NewOperator, secret_keys: list[str]
) -> None:
    """SECRET_KEYS rotate as documented (a new key first, the old one kept to decrypt): the
    cookies were signed with a key from the first entry only, so a rotation logged every operator
    out and refused every form open in a browser. The first key signs; every key verifies."""
    from cryptography.fernet import Fernet

    before = await logged_in(await serving(), db, operator)
    token = await before.csrf("/ui/")
    rotated = Browser(await serving(SECRET_KEYS=[Fernet.generate_key().decode(), *secret_keys]))
    rotated.cookies = dict(before.cookies)
    assert (await rotated.get("/ui/")).status_code == 200
    dropped = Browser(await serving(SECRET_KEYS=[Fernet.generate_key().decode()]))
    dropped.cookies = dict(before.cookies)
    assert (await dropped.get("/ui/")).status_code == 303  # the old key is gone: so is its session
    # a form rendered before the rotation still goes through after it
    assert (await rotated.post("/ui/logout", {"csrf_token": token})).status_code == 303
    rotated.cookies = dict(before.cookies)
    assert (await rotated.get("/ui/")).status_code == 303  # logged out
