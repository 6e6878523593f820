"""Time-ordered UUIDs (RFC 9562 version 7): new rows land at the right edge of every index."""

from __future__ import annotations

import os
import time
from uuid import UUID

_VERSION_VARIANT = 0x7 << 76 | 0x2 << 62
# the 74 random bits: below the timestamp, minus the version nibble and the two variant bits
_RANDOM = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)


def uuid7s(n: int) -> list[UUID]:
    """n version-7 UUIDs: 48 bits of Unix milliseconds, then 74 random bits (one urandom call)."""
    millis = time.time_ns() // 1_000_000
    high = (millis & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_VARIANT
    random = os.urandom(10 * n)
    return [
        UUID(int=high | int.from_bytes(random[i : i + 10], "big") & _RANDOM) for i in range(0, 10 * n, 10)
    ]


def uuid7() -> UUID:
    return uuid7s(1)[0]
