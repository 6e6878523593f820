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


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> str:
    """A response body as the API writes it."""

    def fallback(value: Any) -> Any:
        if isinstance(value, UUID):  # asyncpg's UUID subclass, which orjson does not take as a UUID
            return str(value)
        if default is None:
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        return default(value)

    try:
        return orjson.dumps(obj, default=fallback, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        # integers beyond 64 bits or nesting beyond 255 levels (a task's payload or result may
        # hold them): the standard library, writing times and UUIDs the way orjson does
        def stdlib_fallback(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat().replace("+00:00", "Z")
            return fallback(value)

        return json.dumps(obj, default=stdlib_fallback, sort_keys=True, separators=(",", ":"))


_LONG_NUMBER = re.compile(rb"\d{20,}")


def loads(data: str | bytes) -> Any:
    """A request body. orjson reads integers beyond 64 bits as floats, silently losing digits; a
    body with a run of 20 or more digits is read by the standard library, which keeps them exact."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER.search(raw):
        return json.loads(raw)
    return orjson.loads(raw)


class OrjsonProvider(DefaultJSONProvider):
    def __init__(self, app: Quart, fallback: DefaultJSONProvider) -> None:
        super().__init__(app)
        self._fallback = fallback  # quart-schema's: pydantic models and other non-native types

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj, default=self._fallback.default)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)


def install(app: Quart) -> None:
    """Wrap the provider quart-schema installed (call after QuartSchema(app))."""
    app.json = OrjsonProvider(app, app.json)  # type: ignore[arg-type]
