"""The `http` kind's pure parts: address policy, signatures, Retry-After, outcome rules."""

import base64
import ipaddress
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from app.src.api.http.client import HttpResponse
from app.src.api.http.delivery import classify, judge_status, request_body, retry_after_s
from app.src.api.http.signing import sign_delivery
from app.src.api.models.http import ALLOWED_NETWORKS_CONTEXT, AddressPolicy, HttpPayload, destination

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # shared address space (CGNAT)
        "169.254.169.254",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "fec0::1",  # site-local (deprecated, still routed in older networks)
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:0a00:0001::",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo carrying 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is None


def test_the_allowlist_opens_its_networks_and_their_mapped_forms_only() -> None:
    policy = AddressPolicy((ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")))
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("10.9.9.9")) is None
    assert policy.refusal(ipaddress.ip_address("192.168.1.1")) is not None
    assert policy.refusal(ipaddress.ip_address("::1")) is not None  # IPv6 loopback is not 127/8


def test_cloud_metadata_stays_refused_whatever_the_allowlist() -> None:
    everything = AddressPolicy((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
    for address in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        reason = everything.refusal(ipaddress.ip_address(address))
        assert reason is not None
        assert "metadata" in reason
    assert everything.refusal(ipaddress.ip_address("10.0.0.1")) is None


def test_literal_addresses_are_judged_with_the_deployment_allowlist() -> None:
    with pytest.raises(ValidationError, match="loopback"):
        HttpPayload.model_validate({"url": "http://127.0.0.1:9/"})
    context = {ALLOWED_NETWORKS_CONTEXT: (ipaddress.ip_network("127.0.0.0/8"),)}
    assert HttpPayload.model_validate({"url": "http://127.0.0.1:9/"}, context=context).url.port == 9
    with pytest.raises(ValidationError, match="metadata"):
        HttpPayload.model_validate({"url": "http://169.254.169.254/"}, context=context)
    # names are resolved and checked when the request is made, not at enqueue
    assert HttpPayload.model_validate({"url": "http://localhost:9/"}).url.host == "localhost"


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        HttpPayload.model_validate({"url": "https://example.com/", "headers": {"X": "a\nb"}})
    assert caught.value.errors()[0]["loc"] == ("headers",)


def test_signatures_verify_with_the_standard_webhooks_package_for_each_secret() -> None:
    old = "whsec_" + base64.b64encode(b"old-secret-0123456789abcdef").decode()
    new = "whsec_" + base64.b64encode(b"new-secret-0123456789abcdef").decode()
    body = b'{"order":42}'
    timestamp = int(datetime.now(UTC).timestamp())
    signature = sign_delivery([new, old], msg_id="msg_1", timestamp=timestamp, body=body)
    assert len(signature.split(" ")) == 2
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp), "webhook-signature": signature}
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers) == {"order": 42}


def _response(status: int, **headers: str) -> HttpResponse:
    return HttpResponse(status, "", dict(headers), b"", "https://example.com/a/b", 1.0)


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert retry_after_s(_response(503, **{"Retry-After": "7"}), now=NOW) == 7
    later = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert retry_after_s(_response(503, **{"Retry-After": later}), now=NOW) == 90
    past = format_datetime(NOW - timedelta(seconds=90), usegmt=True)
    assert retry_after_s(_response(503, **{"Retry-After": past}), now=NOW) == 0
    assert retry_after_s(_response(503, **{"Retry-After": "soon"}), now=NOW) is None
    assert retry_after_s(_response(503, **{"Retry-After": "\u00b2"}), now=NOW) is None  # a digit to isdigit()
    assert retry_after_s(_response(503), now=NOW) is None


@pytest.mark.parametrize(
    ("status", "extra", "answer"),
    [
        (200, {}, "completed"),
        (204, {}, "completed"),
        (404, {"success_codes": [404]}, "completed"),
        (200, {"success_codes": [201]}, "discarded"),
        (408, {}, "retry"),
        (429, {}, "retry"),
        (500, {}, "retry"),
        (503, {}, "retry"),
        (400, {}, "discarded"),
        (401, {}, "discarded"),
        (404, {}, "discarded"),
        (302, {}, "discarded"),
        (202, {}, "completed"),  # without follow_async a 202 is a success like any 2xx
        (202, {"follow_async": True}, "waiting"),
    ],
)
def test_outcome_rules(status: int, extra: dict[str, Any], answer: str) -> None:
    payload = HttpPayload.model_validate({"url": "https://example.com/", **extra})
    response = _response(status, Location="/status/1")
    assert classify(payload, response, now=NOW, accept_async=True).answer == answer


def test_a_status_poll_reads_202_as_running_and_303_as_done() -> None:
    payload = HttpPayload.model_validate({"url": "https://example.com/", "follow_async": True})
    assert judge_status(payload, _response(202), now=NOW).answer == "pending"
    assert judge_status(payload, _response(303, Location="/r"), now=NOW).answer == "see_other"
    assert judge_status(payload, _response(200), now=NOW).answer == "completed"
    assert judge_status(payload, _response(503), now=NOW).answer == "retry"
    assert judge_status(payload, _response(404), now=NOW).answer == "discarded"


def test_json_is_sent_compact_with_its_content_type() -> None:
    payload = HttpPayload.model_validate({"url": "https://example.com/", "json": {"a": [1, 2]}})
    assert request_body(payload) == (b'{"a":[1,2]}', "application/json")
    assert request_body(HttpPayload.model_validate({"url": "https://example.com/"})) == (None, None)


def test_one_host_written_differently_is_one_destination() -> None:
    # one host key per destination: otherwise its limit, circuit and metrics split between spellings
    # (a tenant could double its concurrency against one target by writing it twice)
    spellings = [
        "https://example.com/a",
        "https://EXAMPLE.com/a",
        "https://example.com:443/a",
        "https://example.com./a",
        "https://Example.COM.:443/a",
    ]
    assert {destination(url) for url in spellings} == {"example.com:443"}
    assert destination("http://example.com.:80/") == destination("http://example.com") == "example.com:80"
    assert destination("https://example.com:8443/") == "example.com:8443"
