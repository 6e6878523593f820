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
    "test.flaky": [
        {"fail_times": 2},
        {"fail_times": 1, "retry_after_s": 0.5},
        {"fail_times": 1, "permanent": True},
    ],
}
INVALID: dict[str, list[dict[str, Any]]] = {
    "sleep": [{}, {"seconds": -1}, {"seconds": "soon"}, {"seconds": 1, "extra": True}],
    "test.record": [{}],
    "test.flaky": [{"fail_times": "x"}],
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
    ]  # fmt: skip
