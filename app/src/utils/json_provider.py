"""JSON for requests and responses through orjson.

A batch of a thousand tasks is a large body in and a large body out; the standard library's
encoder calls a Python hook for every UUID and datetime. orjson handles those natively, writes
UTC times with "Z" like pydantic does, and keeps keys sorted so answers stay stable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from quart import Quart
from quart.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# Objects read from a request body have string keys only: without OPT_NON_STR_KEYS orjson takes its
# faster path (a third of the time of a thousand enqueued tasks' answer).
_STR_KEYS_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_SORT_KEYS


def _plain(value: Any) -> Any:
    """What neither encoder writes our way by itself: asyncpg's UUID subclass (orjson does not take
    it for a UUID) and datetimes on the standard-library path ("Z", like orjson and pydantic)."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj: Any, default: Callable[[Any], Any] = _plain) -> str:
    """A response body as the API writes it."""
    try:
        return orjson.dumps(obj, default=default, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        # integers beyond 64 bits or nesting beyond 255 levels (a task's payload or result may
        # hold them): the standard library takes those
        return json.dumps(obj, default=default, sort_keys=True, separators=(",", ":"))


def dumps_parsed(obj: Any) -> bytes:
    """A response body built from what a request body held (string keys only), as bytes: `dumps`
    gives the same text."""
    try:
        return orjson.dumps(obj, default=_plain, option=_STR_KEYS_OPTIONS)
    except orjson.JSONEncodeError:
        return dumps(obj).encode()


_LONG_NUMBER = re.compile(rb"\d{20,}")
# A JSON string with its escapes (the unrolled form: linear, no backtracking per character).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_BRACKETS_OR_QUOTES = bytes(b for b in range(256) if b not in b'"[]{}')
_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")
MAX_DEPTH = 64


class TooDeep(ValueError):
    """A request body nested deeper than the configured maximum."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels")
        self.max_depth = max_depth


def nesting_exceeds(raw: bytes, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than `max_depth`, without parsing (the parsers
    recurse: the standard library's raises RecursionError, which no caller expects)."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:  # the common case, in C
        return False
    # Each pass takes away the innermost pairs (replace does not look again at what a removal
    # joins): a pair still left after `max_depth` passes sits deeper than that. In C: a byte at a
    # time in Python, an 8 MiB body of small values took 0.4 s of the event loop. What is not
    # balanced is left for the parser to refuse.
    pairs = _outside_strings(raw).translate(_AS_PARENS)
    for _ in range(max_depth):
        pairs = pairs.replace(b"()", b"")
        if not pairs:
            return False
    return b"()" in pairs


def _outside_strings(raw: bytes) -> bytes:
    """The brackets of `raw` that are not inside a JSON string."""
    if b"\\" not in raw and raw.count(b'"') % 2 == 0:
        # No escapes: every quote opens or closes a string, so the strings are every other piece
        # between quotes (a fifth of the regex's time on a batch of a thousand tasks).
        return b"".join(raw.translate(None, _NOT_BRACKETS_OR_QUOTES).split(b'"')[::2])
    return _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """A request body. orjson reads integers beyond 64 bits as floats, silently losing digits; a
    body with a run of 20 or more digits is read by the standard library, which keeps them exact.

    Raises ValueError for anything that is not JSON in UTF-8 (UnicodeDecodeError is one) and
    TooDeep beyond `max_depth` levels of nesting."""
    raw = data.encode() if isinstance(data, str) else data
    if nesting_exceeds(raw, max_depth):
        raise TooDeep(max_depth)
    if _LONG_NUMBER.search(raw):
        return _exact_loads(raw)
    return orjson.loads(raw)


# What the standard library reads and orjson refuses: NaN and the infinities (not JSON), and the
# escape of a lone surrogate (no character: PostgreSQL's text and jsonb refuse it). Read, they went
# as far as the database, and a payload holding one was a 500 instead of this 400.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _exact_loads(raw: bytes) -> Any:
    """A body with integers beyond 64 bits, read by the standard library held to what orjson reads."""
    value = json.loads(raw, parse_constant=_not_json)
    # a surrogate pair's two escapes are one character once read: only a lone one cannot be encoded
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a lone surrogate is not a character") from None
    return value


class OrjsonProvider(DefaultJSONProvider):
    def __init__(self, app: Quart, fallback: DefaultJSONProvider) -> None:
        super().__init__(app)
        self._fallback = fallback  # quart-schema's: pydantic models and other non-native types

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj, default=self._default)

    def _default(self, value: Any) -> Any:
        if isinstance(value, UUID | datetime):
            return _plain(value)
        return self._fallback.default(value)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)


def install(app: Quart) -> None:
    """Wrap the provider quart-schema installed (call after QuartSchema(app))."""
    app.json = OrjsonProvider(app, app.json)  # type: ignore[arg-type]
