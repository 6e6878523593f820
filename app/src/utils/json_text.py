"""JSON text for PostgreSQL json/jsonb parameters and results.

Writing goes through orjson (UUIDs, datetimes and dataclasses natively, several times faster than
the standard library on the enqueue and completion paths), falling back to the standard library for
what orjson refuses: integers beyond 64 bits and nesting deeper than 255 levels. Reading uses the
standard library, which keeps such integers exact (orjson would turn them into floats).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS
_ROW_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC
NUL_MESSAGE = "text must not contain the NUL character (\\u0000): PostgreSQL cannot store it"


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:  # the standard library takes it, or raises TypeError
        return _standard(value)


def dumps_rows(rows: Sequence[Any]) -> str:
    """Rows (dicts or dataclasses) for a json_to_recordset parameter: ids and times as PostgreSQL
    reads them (a time without a zone is UTC, as the driver takes it; the session's zone never
    applies)."""
    try:
        return orjson.dumps(rows, default=_row_value, option=_ROW_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return _standard(rows, default=_row_value)


def _row_value(value: Any) -> Any:
    """What orjson does not write by itself: the driver's UUID subclass (and, on the standard
    library's path, every UUID, datetime and dataclass)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in fields(value)}
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _standard(value: Any, default: Any = None) -> str:
    try:
        return json.dumps(value, default=default)
    except RecursionError:  # a ValueError, like every other value JSON cannot hold
        raise ValueError("the value is nested too deeply to write as JSON") from None


loads = json.loads


def contains_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in a string or a key (jsonb refuses those).

    Looked for in one pass in C first (free_of_nul): walked in Python, an 8 MiB body of small
    values took 2.3 s of the event loop. The walk, only when that pass finds the escape or cannot
    write the value, is iterative, so a deeply nested value (a handler's result has no depth
    bound) cannot exhaust the interpreter's stack."""
    if free_of_nul([value]):
        return False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def free_of_nul(values: list[Any]) -> bool:
    """True when no string or key in `values` holds a NUL character, found in one pass in C: JSON
    text writes each NUL as the escape \\u0000. False when one may (that escape's text may also be
    a string's own, or orjson cannot write the values): `contains_nul` then tells which."""
    try:
        return b"\\u0000" not in orjson.dumps(values, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return False


# A surrogate alone is not a character: UTF-8 cannot encode it, so neither text nor jsonb stores it.
# Python makes them of undecodable bytes (surrogateescape: aiohttp's HTTP header values and reason
# phrases, os and sys texts).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> bool:
    """Whether `text` holds a NUL character or a lone surrogate, which PostgreSQL's text cannot hold."""
    return _UNSTORABLE.search(text) is not None


def storable_text(text: str) -> str:
    """`text` with each NUL character and each lone surrogate (which PostgreSQL's text cannot hold)
    shown as U+FFFD, as an undecodable byte is: for texts that come from outside and are kept as a
    record (an error message, a response's headers and body), where refusing them would lose the
    record."""
    return _UNSTORABLE.sub("\ufffd", text)


def storable(value: Any) -> str:
    """The JSON text of a value PostgreSQL's jsonb can store; ValueError saying why it cannot."""
    try:
        text = dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if contains_nul(value):
        raise ValueError(NUL_MESSAGE)
    return text
