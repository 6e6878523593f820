"""The enqueue routes' fast response body must be exactly what TaskOut would have written."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import asyncpg.pgproto.pgproto as pgproto
import pytest

from app.src.api.models.tasks import Task, TaskOut, task_body
from app.src.utils import json_provider
from app.src.utils.ids import uuid7, uuid7s

NOW = datetime(2026, 11, 22, 1, 2, 3, 456789, tzinfo=UTC)


def _task(**changes: object) -> Task:
    fields: dict[str, object] = {
        "id": uuid7(),
        "client_id": uuid4(),
        "queue_id": 7,
        "queue": "emails",
        "kind": "noop",
        "payload": {"order": 42, "nested": {"list": [1, 2.5, None, "x"]}, "ünïcode": "✓"},
        "status": "available",
        "priority": 5,
        "attempts": 0,
        "max_attempts": 3,
        "run_at": NOW,
        "created_at": NOW.replace(microsecond=0),
        "started_at": None,
        "finished_at": None,
        "result": None,
        "last_error": None,
        "progress": None,
    }
    fields.update(changes)
    return Task(**fields)  # type: ignore[arg-type]


SHAPES = {
    "new": _task(),
    "finished": _task(
        status="completed",
        attempts=2,
        started_at=NOW + timedelta(seconds=1),
        finished_at=NOW + timedelta(seconds=2, microseconds=1),
        result={"ok": True, "items": [{"a": 1}]},
        progress={"done": 10, "of": 10},
    ),
    "failed": _task(status="discarded", attempts=3, last_error="boom", result=[1, "two"]),
    "scheduled": _task(
        status="scheduled",
        run_at=NOW + timedelta(days=1),
        schedule={"id": str(uuid4()), "fire_time": "2026-11-23T01:02:00+00:00", "coalesced_fires": 2},
    ),
    "asyncpg uuid": _task(id=pgproto.UUID(str(uuid7()))),
    "scalar result": _task(status="completed", result="text"),
}


@pytest.mark.parametrize("task", SHAPES.values(), ids=SHAPES.keys())
def test_task_body_serializes_like_the_taskout_model(task: Task) -> None:
    fast = json.loads(json_provider.dumps_parsed(task_body(task)))
    model = json.loads(TaskOut.from_domain(task).model_dump_json())
    assert fast == model
    assert json_provider.dumps_parsed(task_body(task)) == json_provider.dumps(task_body(task)).encode()


def test_uuid7s_are_version_7_time_ordered_and_distinct() -> None:
    ids = uuid7s(1000)
    assert len(set(ids)) == 1000
    assert {u.version for u in ids} == {7}
    assert {u.variant for u in ids} == {"specified in RFC 4122"}
    millis = int(datetime.now(UTC).timestamp() * 1000)
    assert all(abs((u.int >> 80) - millis) < 5000 for u in ids)
    assert uuid7().int >> 80 >= ids[0].int >> 80  # the millisecond prefix never goes back
