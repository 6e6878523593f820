"""The HTTP surface every module shares: problem+json errors, request ids, headers, metrics, docs."""

import tomllib
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from quart import Quart
from quart.typing import TestClientProtocol as Client

from app.middlewares import public

PROBLEM = "application/problem+json"


async def test_ready_reports_database_and_schema(client: Client) -> None:
    response = await client.get("/api/common/ready")
    assert response.status_code == 200
    body = await response.get_json()
    assert body == {"ready": True, "checks": {"database": True, "migrations": True}}


async def test_ready_through_a_rollout_is_false_on_an_older_schema_only(
    client: Client, clean_database: str
) -> None:
    """Migrated by the next release (a revision this code does not know), this release keeps
    serving while the next one rolls out; it is unready only on a schema older than its own."""
    from tests.task_harness import fetch

    [current] = await fetch(clean_database, "SELECT version_num FROM alembic_version")
    try:
        for revision, ready in (("0001", False), ("9999_next_release", True)):
            await fetch(clean_database, "UPDATE alembic_version SET version_num = $1", revision)
            response = await client.get("/api/common/ready")
            checks = (await response.get_json())["checks"]
            assert (response.status_code, checks["migrations"]) == ((200, True) if ready else (503, False))
    finally:
        await fetch(clean_database, "UPDATE alembic_version SET version_num = $1", current["version_num"])


async def test_health_and_version(client: Client) -> None:
    assert (await (await client.get("/api/common/health")).get_json()) == {"status": "ok"}
    version = await (await client.get("/api/common/version")).get_json()
    assert version["name"] == "taskgate"
    assert version["schema_heads"]
    # make run and the images install the dependencies only (no package metadata names taskgate):
    # the version is still the project's, never a placeholder
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert version["version"] == project["version"]


async def test_unknown_path_is_a_problem_404(client: Client) -> None:
    response = await client.get("/api/does-not-exist")
    assert response.status_code == 404
    assert response.mimetype == PROBLEM
    body = await response.get_json()
    assert body["status"] == 404
    assert body["title"] == "Not Found"
    assert body["instance"] == "/api/does-not-exist"


async def test_wrong_method_is_a_problem_405_with_allow(client: Client) -> None:
    response = await client.delete("/api/common/health")
    assert response.status_code == 405
    assert response.mimetype == PROBLEM
    assert "GET" in response.headers["Allow"]


async def test_unexpected_error_is_a_bare_500_without_internals(app: Quart) -> None:
    @app.get("/api/test-boom")
    @public
    async def boom() -> Any:
        raise RuntimeError("secret internal detail")

    response = await app.test_client().get("/api/test-boom")
    assert response.status_code == 500
    assert response.mimetype == PROBLEM
    text = await response.get_data(as_text=True)
    assert "secret internal detail" not in text
    assert "Traceback" not in text


async def test_request_id_is_echoed_when_well_formed(client: Client) -> None:
    response = await client.get("/api/common/health", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("bad", ["has space", "x" * 200, "semi;colon"])
async def test_request_id_is_replaced_when_malformed(client: Client, bad: str) -> None:
    response = await client.get("/api/common/health", headers={"X-Request-Id": bad})
    assert response.headers["X-Request-Id"] != bad
    assert len(response.headers["X-Request-Id"]) == 32


async def test_every_response_carries_security_headers(client: Client) -> None:
    for path in ("/api/common/health", "/api/nowhere"):
        response = await client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        assert response.headers["X-Request-Id"]


async def test_cors_allows_only_configured_origins(app: Quart) -> None:
    client = app.test_client()
    settings = app.config["TASKGATE_SETTINGS"]
    assert settings.CORS_ORIGINS == ["https://localhost:8080"]
    allowed = await client.get("/api/common/health", headers={"Origin": "https://localhost:8080"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://localhost:8080"
    other = await client.get("/api/common/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_metrics_count_requests_by_route_and_status(client: Client) -> None:
    await client.get("/api/common/health")
    await client.get("/api/nowhere")
    response = await client.get("/metrics")
    assert response.status_code == 200
    text = await response.get_data(as_text=True)
    assert 'taskgate_http_requests_total{method="GET",route="/api/common/health",status="200"}' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "taskgate_http_request_duration_seconds_bucket" in text


async def test_openapi_is_a_valid_openapi_3_document(client: Client) -> None:
    response = await client.get("/openapi.json")
    spec = await response.get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert "/api/common/ready" in spec["paths"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in (await docs.get_data(as_text=True)).lower()


async def test_openapi_json_has_no_duplicate_keys(client: Client) -> None:
    # Swagger UI refuses a document with a repeated key (a status documented twice, say)
    import json

    repeated: list[str] = []

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in pairs]
        repeated.extend(key for key in set(keys) if keys.count(key) > 1)
        return dict(pairs)

    json.loads(await (await client.get("/openapi.json")).get_data(as_text=True), object_pairs_hook=unique)
    assert repeated == []
