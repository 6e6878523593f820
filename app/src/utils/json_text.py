"""JSON text for PostgreSQL json/jsonb parameters and results.

Writing goes through orjson (UUIDs, datetimes and dataclasses natively, several times faster than
the standard library on the enqueue and completion paths), falling back to the standard library for
what orjson refuses: integers beyond 64 bits and nesting deeper than 255 levels. Reading uses the
standard library, which keeps such integers exact (orjson would turn them into floats).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS
NUL_MESSAGE = "text must not contain the NUL character (\\u0000): PostgreSQL cannot store it"


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:  # the standard library takes it, or raises TypeError
        return json.dumps(value)


loads = json.loads


def contains_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in a string or a key (jsonb refuses those)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(contains_nul(item) for item in value)
    return False
