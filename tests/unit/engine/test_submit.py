"""The enqueue rules as pure functions: defaults, quota, contract and NUL checks, field paths."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from app.src.api.engine import submit
from app.src.api.engine.submit import Submitter, TaskRequest
from app.src.api.engine.task_engine import KindContract, SubmitRules
from app.src.api.errors import TooManyRequests, Unprocessable
from app.src.api.models.tasks import Queue


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str


@dataclass(frozen=True)
class Kind:
    name: str
    max_attempts: int | None = None
    payload: type[BaseModel] = Strict

    def validate_payload(self, payload: Any, *, context: Mapping[str, Any] | None = None) -> Any:
        return self.payload.model_validate(payload, context=dict(context or {}))


@dataclass(frozen=True)
class Kinds:
    by_name: dict[str, Kind]

    def get(self, name: str) -> KindContract | None:
        return self.by_name.get(name)


PLAIN = Kind("plain")
STUBBORN = Kind("stubborn", max_attempts=9)
RULES = SubmitRules(kinds=Kinds({"plain": PLAIN, "stubborn": STUBBORN}), default_max_queued_tasks=10)
CLIENT = Submitter(uuid.uuid4())


def queue(max_attempts: int = 3) -> Queue:
    now = datetime.now(UTC)
    return Queue(1, CLIENT.client_id, "default", None, None, max_attempts, 1.0, 60.0, False, now, now)


def built(request: TaskRequest, kind: Kind | None) -> Any:
    [task] = submit.new_tasks(RULES, CLIENT, [request], [kind], {"default": queue()})
    return task


def test_max_attempts_comes_from_the_request_else_the_kind_else_the_queue() -> None:
    assert built(TaskRequest(kind="stubborn", payload={}, max_attempts=2), STUBBORN).max_attempts == 2
    assert built(TaskRequest(kind="stubborn", payload={}), STUBBORN).max_attempts == 9
    assert built(TaskRequest(kind="plain", payload={}), PLAIN).max_attempts == 3
    assert built(TaskRequest(kind="gone", payload={}), None).max_attempts == 3  # a kind removed since


def test_priority_defaults_to_five_and_an_explicit_one_is_kept() -> None:
    assert built(TaskRequest(kind="plain", payload={}), PLAIN).priority == 5
    assert built(TaskRequest(kind="plain", payload={}, priority=0), PLAIN).priority == 0


def test_rows_carry_the_request_and_its_client() -> None:
    task = built(TaskRequest(kind="plain", payload={"url": "x"}, delay_s=3.0, schedule={"id": "s"}), PLAIN)
    assert (task.client_id, task.queue_id, task.queue, task.kind) == (CLIENT.client_id, 1, "default", "plain")
    assert (task.payload, task.delay_s, task.run_at, task.schedule) == ({"url": "x"}, 3.0, None, {"id": "s"})


def test_the_quota_admits_up_to_the_limit_and_refuses_beyond_with_retry_after() -> None:
    submit.check_quota(RULES, CLIENT, unfinished=8, adding=2)
    with pytest.raises(TooManyRequests) as refused:
        submit.check_quota(RULES, CLIENT, unfinished=8, adding=3)
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "quota is 10" in (refused.value.detail or "")


def test_a_clients_own_quota_replaces_the_default() -> None:
    generous = Submitter(uuid.uuid4(), max_queued_tasks=100)
    submit.check_quota(RULES, generous, unfinished=50, adding=50)
    with pytest.raises(TooManyRequests):
        submit.check_quota(RULES, Submitter(uuid.uuid4(), max_queued_tasks=1), unfinished=1, adding=1)


def fields(error: Unprocessable) -> list[str]:
    return [e["field"] for e in error.errors or []]


def test_an_unknown_kind_names_the_kind_field_under_the_prefix() -> None:
    with pytest.raises(Unprocessable) as single:
        submit.checked_kind(RULES, "nope", {}, at=submit.own_fields(0))
    assert fields(single.value) == ["kind"]
    with pytest.raises(Unprocessable) as batch:
        submit.checked_kind(RULES, "nope", {}, at=submit.batch_item(3))
    assert fields(batch.value) == ["tasks.3.kind"]


def test_a_payload_off_its_contract_names_the_failing_fields() -> None:
    with pytest.raises(Unprocessable) as refused:
        submit.checked_kind(RULES, "plain", {"url": 1, "extra": True}, at=submit.batch_item(0))
    assert sorted(fields(refused.value)) == ["tasks.0.payload.extra", "tasks.0.payload.url"]


def test_a_nul_character_anywhere_in_a_payload_is_refused() -> None:
    with pytest.raises(Unprocessable) as refused:
        submit.checked_kind(RULES, "plain", {"url": "a\u0000b"})
    assert fields(refused.value) == ["payload"]
    with pytest.raises(Unprocessable):
        submit.check_storable({"deep": [{"x": ["\u0000"]}]}, at=("task",))
    submit.check_storable({"fine": ["text", 1, None]})


def test_the_validation_context_is_the_rules_one() -> None:
    seen: list[Mapping[str, Any]] = []

    @dataclass(frozen=True)
    class Watching(Kind):
        def validate_payload(self, payload: Any, *, context: Mapping[str, Any] | None = None) -> Any:
            seen.append(context or {})

    rules = SubmitRules(kinds=Kinds({"w": Watching("w")}), payload_context={"networks": ("10.0.0.0/8",)})
    submit.checked_kind(rules, "w", {})
    assert seen == [{"networks": ("10.0.0.0/8",)}]


@pytest.mark.parametrize(
    ("raw", "key"), [(None, None), ("abc", "abc"), ('"quoted"', "quoted"), ("  spaced  ", "spaced")]
)
def test_idempotency_keys_are_normalized(raw: str | None, key: str | None) -> None:
    assert submit.normalize_idempotency_key(raw) == key


@pytest.mark.parametrize("raw", ["", '""', "x" * 256, "tab\there"])
def test_invalid_idempotency_keys_are_refused(raw: str) -> None:
    with pytest.raises(Unprocessable):
        submit.normalize_idempotency_key(raw)
