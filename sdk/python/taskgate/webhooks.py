"""Verify Taskgate's signed `http` deliveries (Standard Webhooks) in a receiver.

```python
from taskgate import webhooks
webhooks.verify(["whsec_..."], body, request.headers)   # raises webhooks.InvalidSignature
```
During a rotation Taskgate signs with every active secret and a receiver may know several: one
matching signature from any known secret is enough.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

PREFIX = "whsec_"


class InvalidSignature(Exception):
    """The delivery is not signed by a known secret, or is too old or too new."""


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _key(secret: str) -> bytes:
    encoded = secret[len(PREFIX) :] if secret.startswith(PREFIX) else secret
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a signing secret is whsec_ followed by base64") from exc
    if not key:  # anyone can sign with an empty key (Taskgate never makes one)
        raise ValueError("a signing secret must not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of one delivery (what Taskgate sends)."""
    return _signature(_key(secret), msg_id, timestamp, body)


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def verify(
    secrets: str | Iterable[str],
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Check `webhook-id`, `webhook-timestamp` and `webhook-signature`; raise InvalidSignature."""
    # every secret is checked, also those a match makes unneeded: a bad one raises ValueError
    # on the first delivery, not only on the first forgery
    keys = [_key(secret) for secret in ([secrets] if isinstance(secrets, str) else secrets)]
    if not keys:
        raise ValueError("no signing secrets given")
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    # compared, not subtracted: a timestamp no float holds overflowed (OverflowError, not this)
    if not current - tolerance_s <= timestamp <= current + tolerance_s:
        raise InvalidSignature("webhook-timestamp is outside the tolerance")
    raw = body.encode() if isinstance(body, str) else body
    offered = [part.strip() for part in signatures.split(" ") if part.strip().startswith("v1,")]
    for key in keys:
        expected = _signature(key, msg_id, timestamp, raw)
        for candidate in offered:
            if hmac.compare_digest(expected.encode(), candidate.encode()):
                return
    raise InvalidSignature("no signature matches a known secret")
