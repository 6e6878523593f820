"""taskgate.webhooks.verify against what the server signs and what Standard Webhooks' own library
signs: several secrets during a rotation, a tampered body, an old timestamp."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
import time

import pytest
from standardwebhooks.webhooks import Webhook

from app.src.api.http.signing import sign_delivery
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "sdk" / "python"))
from taskgate import webhooks

OLD = "whsec_" + base64.b64encode(os.urandom(32)).decode()
NEW = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = b'{"report": 7}'


def headers(secrets: list[str], *, at: int | None = None, body: bytes = BODY) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    return {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(stamp),
        "Webhook-Signature": sign_delivery(secrets, msg_id="msg_1", timestamp=stamp, body=body),
    }


def test_a_delivery_signed_by_the_server_verifies_with_any_known_secret() -> None:
    signed = headers([NEW, OLD])  # during a rotation the server signs with both
    webhooks.verify([OLD], BODY, signed)
    webhooks.verify(NEW, BODY.decode(), signed)
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify(["whsec_" + base64.b64encode(os.urandom(32)).decode()], BODY, signed)


def test_tampered_bodies_and_old_timestamps_are_refused() -> None:
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify([OLD], b'{"report": 8}', headers([OLD]))
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify([OLD], BODY, headers([OLD], at=int(time.time()) - 301), tolerance_s=300)
    with pytest.raises(webhooks.InvalidSignature):
        webhooks.verify([OLD], BODY, {"webhook-id": "x"})


def test_it_agrees_with_the_standard_webhooks_library() -> None:
    stamp = int(time.time())
    from datetime import UTC, datetime

    signature = Webhook(OLD).sign("msg_2", datetime.fromtimestamp(stamp, UTC), BODY.decode())
    webhooks.verify(
        [OLD], BODY, {"webhook-id": "msg_2", "webhook-timestamp": str(stamp), "webhook-signature": signature}
    )
    Webhook(OLD).verify(BODY, {k.lower(): v for k, v in headers([OLD]).items()})


@pytest.mark.parametrize("empty", ["", "whsec_"])
def test_an_empty_secret_is_refused_not_a_key_anyone_can_sign_with(empty: str) -> None:
    """An unset secret (`os.environ.get("WEBHOOK_SECRET", "")`, or a rotation's old one left
    blank) decoded to an empty HMAC key, which anyone can sign with: a forged delivery passed."""
    stamp = int(time.time())
    mac = hmac.new(b"", f"msg_forged.{stamp}.".encode() + BODY, hashlib.sha256).digest()
    forged = {
        "webhook-id": "msg_forged",
        "webhook-timestamp": str(stamp),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),  # signed with the empty key
    }
    with pytest.raises(ValueError, match="empty"):
        webhooks.verify(empty, BODY, forged)
    with pytest.raises(ValueError, match="empty"):
        webhooks.verify([NEW, empty], BODY, forged)
    with pytest.raises(ValueError, match="empty"):  # refused before any delivery verifies
        webhooks.verify([NEW, empty], BODY, headers([NEW]))


@pytest.mark.parametrize("stamp", ["9" * 400, "-" + "9" * 400])
def test_a_timestamp_no_float_holds_is_an_invalid_signature(stamp: str) -> None:
    """It raised OverflowError (a receiver's 500) where every other bad header raises
    InvalidSignature."""
    signed = headers([OLD])
    signed["Webhook-Timestamp"] = stamp
    with pytest.raises(webhooks.InvalidSignature, match="tolerance"):
        webhooks.verify([OLD], BODY, signed)
