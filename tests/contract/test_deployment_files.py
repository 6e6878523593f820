"""Docker cannot run on the CI machine; what can be checked without it is checked here."""

import yaml

from tests.conftest import ROOT


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_wires_postgres_migrate_api_worker() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}
    assert "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        for variable in ("DB_URI", "SECRET_KEYS", "SSL_CERTFILE", "SSL_KEYFILE"):
            assert variable in env
        assert env["APP_ENV"] == "prod"
    assert "api" in services["api"]["command"][-1]
    assert "worker" in services["worker"]["command"][-1]


def test_images_are_multi_stage_non_root_and_locked() -> None:
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        text = (ROOT / "docker" / name).read_text()
        assert text.count("FROM ") >= 2
        assert "uv sync --frozen --no-dev" in text
        assert "\nUSER taskgate" in text


def test_env_example_documents_every_setting() -> None:
    from app.settings import Settings

    documented = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line
    }
    missing = set(Settings.model_fields) - documented
    assert not missing, f".env.example does not document {sorted(missing)}"


def test_makefile_has_the_commands_the_readme_promises() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("install:", "run:", "test:", "bench:", "start:", "stop:"):
        assert f"\n{target}" in makefile
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme
    assert "make test" in readme


def test_migrations_ship_inside_the_package() -> None:
    assert (ROOT / "app" / "migrations" / "env.py").exists()
    assert list((ROOT / "app" / "migrations" / "versions").glob("0001_*.py"))
