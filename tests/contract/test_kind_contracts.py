"""Contract tests (seed 004): example payloads per kind must keep validating.

A schema change that breaks a payload clients already send fails here, before it ships. Every
declared kind must have examples: a new kind without them fails the meta-test.
"""

from typing import Any

import pytest
from pydantic import ValidationError

from app.src.api.kinds import REGISTRY, load_kinds
from app.src.api.models.tasks import TaskOut

load_kinds(["tests.kinds"])

VALID: dict[str, list[dict[str, Any]]] = {
    "noop": [{}, {"anything": [1, 2, 3]}],
    "sleep": [{"seconds": 0}, {"seconds": 1.5}, {"seconds": 3600}],
    "test.record": [{"path": "/tmp/x"}, {"path": "/tmp/x", "seconds": 0.1}],
    "test.span": [{"path": "/tmp/x", "seconds": 1}],
    "test.returns": [{"value": "x"}, {"value": "x", "nul": True, "big": True}],
    "test.deep": [{"depth": 0}, {"depth": 300}],
    "test.steps": [{"path": "/tmp/x"}, {"path": "/tmp/x", "hold_s": 60, "gate": "/tmp/g"}],
    "test.nap": [{"seconds": 2}, {"seconds": 0.5, "path": "/tmp/x"}],
    "test.hold_then_nap": [{"hold_s": 1, "seconds": 0.2}],
    "test.raises": [{"what": "inner_cancel"}, {"what": "timeout"}],
    "test.slow_unwind": [{"seconds": 60, "unwind_s": 4}],
    "test.wait_shaped_step": [{"seconds": 0.1}],
    "test.step_named_like_a_sleep": [{"seconds": 0}],
    "test.await_signal": [
        {"name": "shipped"},
        {"name": "approved", "timeout_s": 1},
        {"name": "approved", "timeout_s": 1, "nap_s": 5},
    ],
    "test.child": [{"i": 1}, {"i": 2, "path": "/tmp/x", "fail": True}],
    "test.limits": [{}, {"big_step": True}, {"children": 10_001}, {"steps": 1_001}],
    "test.fanout": [{"children": 3}, {"children": 500, "path": "/tmp/x", "fail": [7], "queue": "q"}],
    "test.spawn_then_end": [{"queue": "q"}, {"queue": "q", "hold_s": 1, "end": "complete"}],
    "test.gather_stranger": [{"stranger": ""}, {"stranger": "01a250aa-122b-7e1d-a301-39218add4024"}],
    "test.wait_named_like_a_step": [{"wait": "sleep"}, {"wait": "signal"}],
    "test.spawn_in_step": [
        {"path": "/tmp/c", "failed_once": "/tmp/f"},
        {"path": "/tmp/c", "failed_once": "/tmp/f", "gather": False},
    ],
    "test.flaky": [
        {"fail_times": 2},
        {"fail_times": 1, "retry_after_s": 0.5},
        {"fail_times": 1, "permanent": True},
    ],
    "http": [
        {"url": "https://example.com/hooks"},
        {"url": "https://example.com/hooks", "method": "put", "json": {"order": 42}},
        {"url": "http://example.com:8080/x", "body": "plain text", "headers": {"X-Trace": "abc"}},
        {"url": "https://example.com/", "json": None},
        {"url": "https://93.184.215.14/", "timeout_s": 900, "success_codes": [200, 404]},
        {"url": "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/", "method": "GET"},
        {"url": "https://example.com/jobs", "follow_async": True, "async_deadline_s": 60},
        {"url": "https://example.com/moved", "follow_redirects": True},
    ],
}
INVALID: dict[str, list[dict[str, Any]]] = {
    "sleep": [{}, {"seconds": -1}, {"seconds": "soon"}, {"seconds": 1, "extra": True}],
    "test.record": [{}],
    "test.span": [{"path": "/tmp/x"}],
    "test.returns": [{"nul": True}],
    "test.flaky": [{"fail_times": "x"}],
    "test.deep": [{}, {"depth": "deep"}],
    "http": [
        {},  # no URL
        {"url": "ftp://example.com/file"},  # bad scheme
        {"url": "example.com/no-scheme"},
        {"url": "https://user:secret@example.com/"},  # credentials belong in headers
        {"url": "https://example.com/", "headers": {"X-Evil": "a\r\nInjected: 1"}},  # header injection
        {"url": "https://example.com/", "headers": {"X-Evil\r\nInjected": "1"}},
        {"url": "https://example.com/", "headers": {"Bad Name": "1"}},
        {"url": "https://example.com/", "headers": {"webhook-signature": "v1,forged"}},
        {"url": "https://example.com/", "headers": {"Host": "internal"}},
        {"url": "https://example.com/", "body": "x", "json": {"y": 1}},  # body and json both
        {"url": "https://example.com/", "timeout_s": 0},
        {"url": "https://example.com/", "timeout_s": 901},
        {"url": "https://example.com/", "method": "TRACE"},
        {"url": "https://example.com/", "success_codes": []},
        {"url": "https://example.com/", "success_codes": [700]},
        {"url": "https://example.com/", "unknown": True},
        {"url": "http://127.0.0.1/"},  # literal forbidden addresses, without an allowlist
        {"url": "http://2130706433/"},  # 127.0.0.1, spelled as one number
        {"url": "http://10.0.0.1/"},
        {"url": "http://169.254.169.254/latest/meta-data/"},  # cloud metadata
        {"url": "http://[fd00:ec2::254]/"},
        {"url": "http://[::ffff:127.0.0.1]/"},  # IPv4-mapped loopback
        {"url": "http://[2002:7f00:1::1]/"},  # 6to4 of 127.0.0.1
        {"url": "http://0.0.0.0:8080/"},
        {"url": "http://[::1]/"},
    ],
}


def test_every_kind_has_example_payloads() -> None:
    declared = {kind.name for kind in REGISTRY.all()}
    assert declared - set(VALID) == set(), "declare example payloads for every kind"


@pytest.mark.parametrize(("kind", "payload"), [(k, p) for k, ps in VALID.items() for p in ps])
def test_examples_validate(kind: str, payload: dict[str, Any]) -> None:
    registered = REGISTRY.get(kind)
    assert registered is not None
    registered.validate_payload(payload)


@pytest.mark.parametrize(("kind", "payload"), [(k, p) for k, ps in INVALID.items() for p in ps])
def test_counter_examples_are_rejected(kind: str, payload: dict[str, Any]) -> None:
    registered = REGISTRY.get(kind)
    assert registered is not None
    with pytest.raises(ValidationError):
        registered.validate_payload(payload)


def test_task_shape_matches_spec() -> None:
    assert list(TaskOut.model_fields) == [
        "id", "queue", "kind", "payload", "status", "priority", "attempts", "max_attempts",
        "run_at", "created_at", "started_at", "finished_at", "result", "last_error", "progress",
        "schedule",  # optional, beyond SPEC: {id, fire_time, coalesced_fires, manual} of a schedule fire
        "concurrency_key", "blocked_by", "debounced",  # SPEC part two, flow control by key
        "waiting_for", "parent_id", "depends_on",  # SPEC part two, durable composition
    ]  # fmt: skip
