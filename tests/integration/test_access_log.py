"""The access log: one JSON line per request, and none at all with ACCESS_LOG_LEVEL=OFF."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from app import create_app
from app.settings import ACCESS_LOGGER, Settings, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET)
    structlog.reset_defaults()


@pytest.mark.parametrize("level", ["INFO", "OFF"])
async def test_access_lines_follow_access_log_level(
    settings: Settings,
    clean_database: str,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
    level: str,
) -> None:
    configured = settings.model_copy(update={"LOG_FORMAT": "json", "ACCESS_LOG_LEVEL": level})
    configure_logging(configured)
    app = create_app(configured)
    response = await app.test_client().get("/api/common/health", headers={"X-Request-Id": "probe-1"})
    assert response.status_code == 200
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == ACCESS_LOGGER]
    if level == "OFF":
        assert access == []
    else:
        assert access == [
            {
                "method": "GET",
                "route": "/api/common/health",
                "path": "/api/common/health",
                "status": 200,
                "duration_ms": access[0]["duration_ms"],
                "request_id": "probe-1",
                "client_id": None,
                "event": "request",
                "level": "info",
                "logger": ACCESS_LOGGER,
                "timestamp": access[0]["timestamp"],
            }
        ]
