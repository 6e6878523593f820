"""JSON for requests and responses through orjson.

A batch of a thousand tasks is a large body in and a large body out; the standard library's
encoder calls a Python hook for every UUID and datetime. orjson handles those natively, writes
UTC times with "Z" like pydantic does, and keeps keys sorted so answers stay stable.
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Quart
from quart.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


class OrjsonProvider(DefaultJSONProvider):
    def __init__(self, app: Quart, fallback: DefaultJSONProvider) -> None:
        super().__init__(app)
        self._fallback = fallback  # quart-schema's: pydantic models and other non-native types

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=self._fallback.default, option=_OPTIONS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def install(app: Quart) -> None:
    """Wrap the provider quart-schema installed (call after QuartSchema(app))."""
    app.json = OrjsonProvider(app, app.json)  # type: ignore[arg-type]
