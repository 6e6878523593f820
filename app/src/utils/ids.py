"""Time-ordered UUIDs (RFC 9562 version 7): new rows land at the right edge of every index."""

from __future__ import annotations

import os
import time
from uuid import UUID


def uuid7() -> UUID:
    """48 bits of Unix milliseconds, then 74 random bits (version and variant bits set)."""
    millis = time.time_ns() // 1_000_000
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return UUID(int=value)
