"""JSON text for PostgreSQL json/jsonb parameters and results, through orjson.

orjson writes UUIDs, datetimes and dataclasses natively and is several times faster than the
standard library on the enqueue and completion paths. Reading falls back to the standard library
for the one thing orjson refuses: numbers beyond a double, which jsonb can hold.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=_OPTIONS).decode()


def loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
