"""Reuse pydantic TypeAdapters in quart-schema instead of building one per request.

quart-schema's conversion helpers call `TypeAdapter(model)` for every request body and every
response they validate; building an adapter costs more than validating a task. Adapters are
immutable and keyed by type, so one per type is equivalent and much cheaper.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import TypeAdapter


@functools.lru_cache(maxsize=1024)
def cached_adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def install() -> None:
    """Point quart-schema's conversion module at the cache (idempotent)."""
    from quart_schema import conversion

    conversion.TypeAdapter = cached_adapter  # type: ignore[attr-defined,assignment]
