"""What an on-call engineer reads from a real server process: JSON lines only, one access line per
request, the kinds and roles at start-up, the traceback of a failed task, a guarded /metrics with
every queue's depth, and a typo in TASK_KIND_MODULES as one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app import create_app
from app.settings import ConfigurationError, load_settings
from app.src.api.models.auth import IssuedKey
from tests.conftest import ROOT, bearer, subprocess_env
from tests.e2e.conftest import start_server, wait_ready
from tests.task_harness import eventually

METRICS_TOKEN = "metrics-token-for-tests"


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line that is not JSON in the JSON profile: {line!r}") from None
    return parsed


async def test_an_on_call_engineer_can_read_the_service(
    clean_database: str, tmp_path: Path, api_client: IssuedKey
) -> None:
    server = start_server(
        clean_database,
        tmp_path / "server",
        roles="api,worker,scheduler",
        env={"TASK_KIND_MODULES": "tests.kinds", "METRICS_TOKEN": METRICS_TOKEN, "LOG_LEVEL": "INFO"},
    )
    headers = bearer(api_client.api_key)
    try:
        connector = aiohttp.TCPConnector(ssl=server.ssl_context())
        async with aiohttp.ClientSession(base_url=server.base_url, connector=connector) as https:
            await wait_ready(https)
            # /metrics: closed without the token, or with a wrong one of the same length
            async with https.get("/metrics") as response:
                assert response.status == 401
                assert response.content_type == "application/problem+json"
            wrong = "x" * len(METRICS_TOKEN)
            async with https.get("/metrics", headers=bearer(wrong)) as response:
                assert response.status == 401
            async with https.put("/api/queues/ops-idle", json={}, headers=headers) as response:
                assert response.status in (200, 201)
            async with https.post(
                "/api/tasks",
                json={"kind": "test.deep", "queue": "ops", "payload": {"depth": 300}},
                headers=headers,
            ) as response:
                assert response.status == 201
                task = await response.json()
                enqueue_request_id = response.headers["X-Request-Id"]
            async with https.get(f"/api/tasks/{task['id']}?wait=20", headers=headers) as response:
                assert (await response.json())["status"] == "discarded"
            async with https.get(f"/api/tasks/{task['id']}/attempts", headers=headers) as response:
                (attempt,) = (await response.json())["items"]
            assert attempt["error"] == "ValueError: boom at the bottom"
            trace = attempt["traceback"]
            assert len(trace) <= 8192
            assert trace.startswith("…")
            assert trace.rstrip().endswith("ValueError: boom at the bottom")
            assert "in _descend" in trace

            async def scrape() -> str:
                async with https.get("/metrics", headers=bearer(METRICS_TOKEN)) as response:
                    assert response.status == 200
                    return await response.text()

            # every queue has its depth series, zeros included (the idle queue never had a task)
            text = await eventually(
                lambda: _has(scrape, 'taskgate_queue_depth{queue="ops-idle",status="available"} 0.0'),
                timeout=15,
            )
            assert 'taskgate_queue_oldest_available_age_seconds{queue="ops-idle"} 0.0' in text
            assert 'taskgate_queue_depth{queue="ops",status="running"} 0.0' in text
            assert (
                'taskgate_task_outcomes_total{kind="test.deep",outcome="discarded",queue="ops"} 1.0' in text
            )
            assert 'taskgate_task_duration_seconds_count{kind="test.deep",queue="ops"} 1.0' in text
            assert "taskgate_worker_capacity_tasks 200.0" in text
            assert "taskgate_worker_running_tasks 0.0" in text
    finally:
        assert server.stop() == 0
    lines = json_lines(server.log())  # the JSON profile writes no plain-text banner
    started = next(line for line in lines if line["event"] == "runtime started")
    assert started["roles"] == ["api", "scheduler", "worker"]
    assert {"http", "noop", "sleep", "test.deep"} <= set(started["kinds"])
    assert any(line["event"].startswith("serving https://") for line in lines)
    access = [line for line in lines if line.get("logger") == "taskgate.access"]
    enqueue = next(line for line in access if line["request_id"] == enqueue_request_id)
    assert enqueue["method"] == "POST"
    assert enqueue["route"] == "/api/tasks"
    assert enqueue["status"] == 201
    assert enqueue["client_id"] == str(api_client.client_id)
    assert enqueue["duration_ms"] > 0
    assert enqueue["level"] == "info"
    refused = next(line for line in access if line["route"] == "/metrics" and line["status"] == 401)
    assert refused["client_id"] is None
    failed = next(line for line in lines if line["event"] == "task failed")
    assert failed["task_id"] == task["id"]
    assert "ValueError: boom at the bottom" in failed["traceback"]


async def _has(scrape: Any, line: str) -> str | None:
    text: str = await scrape()
    return text if line in text else None


TYPO = "TASK_KIND_MODULES names 'tests.kindz', which cannot be imported (no module 'tests.kindz')"


def test_a_typo_in_task_kind_modules_is_one_clear_line(clean_database: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "worker"],
        cwd=ROOT,
        env=subprocess_env(
            APP_ENV="test",
            DB_URI=clean_database,
            DATA_DIR=tmp_path,
            SECRET_KEYS="k",
            TASK_KIND_MODULES="tests.kinds,tests.kindz",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"taskgate: {TYPO}"]
    # `serve` builds its app the same way (create_app loads the kinds), and fails the same way
    with pytest.raises(ConfigurationError, match=re.escape(TYPO)):
        create_app(load_settings(APP_ENV="test", DB_URI=clean_database, TASK_KIND_MODULES=["tests.kindz"]))


def test_a_worker_that_cannot_reach_the_database_at_start_says_so_in_json(tmp_path: Path) -> None:
    """`serve` logs the failure as a JSON line and exits 3; `worker` once printed a raw Python
    traceback in the middle of a JSON log stream (what a pod started before its database shows)."""
    result = subprocess.run(
        [sys.executable, "-m", "app", "worker"],
        cwd=ROOT,
        env=subprocess_env(
            APP_ENV="test",
            DB_URI="postgresql+asyncpg://taskgate@127.0.0.1:9/none",
            DATA_DIR=tmp_path,
            SECRET_KEYS="k",
            LOG_FORMAT="json",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    lines = json_lines(result.stderr)  # every line is one JSON object
    failed = next(line for line in lines if line["event"] == "runtime failed to start")
    assert failed["level"] == "error"
    assert "the database is unavailable" in failed["error"]
