"""The Kubernetes example of docs/operations.md: API and worker Deployments with probes that point
at real endpoints, a grace period longer than the worker's, and commands that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from app.__main__ import parser
from app.settings import ConfigurationError, load_settings

MANIFESTS = Path(__file__).resolve().parents[2] / "docs" / "kubernetes" / "taskgate.yaml"


def documents() -> dict[tuple[str, str], Any]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFESTS.read_text())}


def test_api_and_worker_deployments_have_probes_and_a_long_enough_grace() -> None:
    docs = documents()
    grace_s = float(docs[("ConfigMap", "taskgate")]["data"]["WORKER_SHUTDOWN_GRACE_S"])
    for name in ("taskgate-api", "taskgate-worker"):
        pod = docs[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace_s
        (container,) = pod["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/api/common/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/api/common/ready"
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        parser().parse_args(container["args"])  # a command python -m app accepts
    migrate = docs[("Job", "taskgate-migrate")]["spec"]["template"]["spec"]["containers"][0]
    parser().parse_args(migrate["args"])
    assert "target_session_attrs=read-write" in docs[("Secret", "taskgate")]["stringData"]["DB_URI"]


def test_the_example_secret_does_not_start_production_until_it_is_edited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its SECRET_KEYS is a placeholder, which production once took for a key (and encrypted every
    TOTP and signing secret under a key anyone who read the example knows)."""
    secret = documents()[("Secret", "taskgate")]["stringData"]
    monkeypatch.setenv("SECRET_KEYS", secret["SECRET_KEYS"])
    monkeypatch.setenv("DB_URI", "postgresql+asyncpg://db/x")
    monkeypatch.setenv("TLS_TERMINATED_UPSTREAM", "true")
    with pytest.raises(ConfigurationError, match="SECRET_KEYS as Fernet keys"):
        load_settings(APP_ENV="prod")
