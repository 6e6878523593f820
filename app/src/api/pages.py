"""Keyset pages: the opaque cursor of the list endpoints that page by a sort key, in one codec.

A cursor is the sort key of a page's last item (base64url of a JSON array); the next page starts
after it. A cursor this API did not make is a 422 naming `query.cursor`, never a 500 and never
a silent first page. (GET /api/tasks keeps its own, older cursor format.)
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from app.src.api.errors import Unprocessable
from app.src.utils import json_text

T = TypeVar("T")
Key = tuple[str | int, ...]
# a sort key's integer is a bigint column's value
BIGINT = range(-(2**63), 2**63)


def invalid_cursor() -> Unprocessable:
    return Unprocessable(
        "The cursor is not one this API returned.",
        errors=[{"field": "query.cursor", "message": "invalid cursor", "type": "value_error"}],
    )


def encode(key: Key) -> str:
    text = json.dumps(list(key), separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(cursor: str, *shape: type[str] | type[int]) -> Key:
    """The sort key in `cursor`, whose parts have the types of `shape` (else a 422)."""
    try:
        key: Any = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise invalid_cursor() from None
    if (
        not isinstance(key, list)
        or len(key) != len(shape)
        # bool is an int to isinstance; no sort key is one
        or not all(type(part) is kind for part, kind in zip(key, shape, strict=True))
        # what no column holds went as far as the driver, which raised (a 500)
        or any(json_text.unstorable(part) if isinstance(part, str) else part not in BIGINT for part in key)
    ):
        raise invalid_cursor()
    return tuple(key)


def page(found: Sequence[T], limit: int, key: Callable[[T], Key]) -> tuple[list[T], str | None]:
    """A page of `limit` from up to `limit + 1` rows read: the items, and the cursor of the next
    page (None: this is the last one)."""
    items = list(found[:limit])
    return items, encode(key(items[-1])) if len(found) > limit else None


def time_id_key(created_at: datetime, item_id: UUID) -> Key:
    return (created_at.isoformat(), str(item_id))


def decode_time_id(cursor: str) -> tuple[datetime, UUID]:
    """A cursor made by `time_id_key` (lists ordered by creation time, then id)."""
    created_at, item_id = decode(cursor, str, str)
    try:
        when, which = datetime.fromisoformat(str(created_at)), UUID(str(item_id))
    except ValueError:
        raise invalid_cursor() from None
    if when.tzinfo is None:
        raise invalid_cursor()
    return when, which
