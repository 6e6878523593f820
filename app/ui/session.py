"""The console's browser session: the operator session token in a signed cookie, idle timeout, CSRF.

The cookie carries the same opaque session token an API login hands out (so logout, disablement
and the 12-hour absolute lifetime are the API sessions' own, enforced in PostgreSQL on every
request), plus the time of the last request, signed: a cookie not used for IDLE_TIMEOUT_S is
refused and its session revoked. The cookie is re-signed on every authenticated response.

CSRF: every state-changing request carries a token bound to the session (an HMAC of the session
token; before login, of a random pre-login cookie), as a form field or an `X-CSRF-Token` header.
`check_csrf` is the one place that checks it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass

from flask.sansio.app import App
from quart import current_app, g, request
from werkzeug.sansio.response import Response

from app.src.api.auth.operators import MFA_TTL_S, SESSION_TTL_S
from app.src.encryption.tokens import same

SESSION_COOKIE = "tg_session"
MFA_COOKIE = "tg_mfa"
PRE_COOKIE = "tg_pre"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
IDLE_TIMEOUT_S = 30 * 60
ABSOLUTE_TIMEOUT_S = SESSION_TTL_S
COOKIE_PATH = "/ui"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_KEY = "taskgate.ui.key"


def install(app: App) -> None:
    """Derive the cookie-signing keys once, one per SECRET_KEYS entry (or one per process without
    any): the first signs, every one verifies, so rotating SECRET_KEYS (a new key first, the old
    one kept) logs no operator out."""
    settings = app.config["TASKGATE_SETTINGS"]
    materials = [key.encode() for key in settings.SECRET_KEYS] or [os.urandom(32)]
    app.extensions[_KEY] = [
        hmac.new(material, b"taskgate console cookies v1", hashlib.sha256).digest() for material in materials
    ]


def _keys() -> list[bytes]:
    keys: list[bytes] = current_app.extensions[_KEY]
    return keys


def _mac(*parts: str, key: bytes | None = None) -> str:
    return hmac.new(key or _keys()[0], "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _signed(signature: str, *parts: str) -> bool:
    """`signature` is the MAC of `parts` under any of the keys (bytes compared in constant time:
    compare_digest raises TypeError for a str with non-ASCII characters, and a cookie or a form
    field can hold any)."""
    return any(same(signature, _mac(*parts, key=key)) for key in _keys())


@dataclass(frozen=True, slots=True)
class BrowserSession:
    token: str
    expires_at: int  # epoch seconds: the session's absolute end
    seen: int = 0  # epoch seconds: the last use its cookie carries (0 for a new one)

    def ends_at(self) -> int:
        """When it ends unless used again: idle too long, or its absolute end."""
        return min(self.expires_at, self.seen + IDLE_TIMEOUT_S) if self.seen else self.expires_at


def pack(session: BrowserSession, *, now: float | None = None) -> str:
    seen = str(int(time.time() if now is None else now))
    expires = str(session.expires_at)
    return ".".join((session.token, expires, seen, _mac("session", session.token, expires, seen)))


def unpack(value: str | None, *, now: float | None = None) -> tuple[BrowserSession | None, str | None]:
    """(the live session in a cookie value, or None; the token of a genuine cookie left idle too long,
    which the caller revokes). A forged or malformed value gives (None, None)."""
    if not value:
        return None, None
    parts = value.rsplit(".", 3)
    if len(parts) != 4:
        return None, None
    token, expires, seen, signature = parts
    if not _signed(signature, "session", token, expires, seen):
        return None, None
    moment = time.time() if now is None else now
    try:
        if moment >= int(expires):
            return None, None
        if moment - int(seen) > IDLE_TIMEOUT_S:
            return None, token
    except ValueError:
        return None, None
    return BrowserSession(token=token, expires_at=int(expires), seen=int(seen)), None


def secure_cookie(response: Response, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max(0, max_age), path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict"
    )


def forget_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")


def set_session(response: Response, session: BrowserSession) -> None:
    secure_cookie(response, SESSION_COOKIE, pack(session), max_age=session.expires_at - int(time.time()))


def set_mfa(response: Response, mfa_token: str) -> None:
    secure_cookie(response, MFA_COOKIE, mfa_token, max_age=MFA_TTL_S)


def pre_login_nonce() -> str:
    """The pre-login cookie value this request has or will set (binds the login forms' CSRF)."""
    nonce = getattr(g, "ui_pre_nonce", None)
    if nonce is None:
        nonce = request.cookies.get(PRE_COOKIE) or os.urandom(16).hex()
        g.ui_pre_nonce = nonce
    return str(nonce)


def _csrf_parts() -> tuple[str, str]:
    session: BrowserSession | None = getattr(g, "ui_session", None)
    if session is not None:
        return "csrf", hashlib.sha256(session.token.encode()).hexdigest()
    return "csrf-login", pre_login_nonce()


def csrf_token() -> str:
    """The token this page's forms must send back."""
    return _mac(*_csrf_parts())


async def check_csrf() -> bool:
    """True for a safe method or a state-changing request carrying this session's token."""
    if request.method in SAFE_METHODS:
        return True
    sent = request.headers.get(CSRF_HEADER)
    if not sent:
        form = await request.form
        sent = form.get(CSRF_FIELD)
    return bool(sent) and _signed(str(sent), *_csrf_parts())
