"""The Kubernetes example of docs/operations.md: API and worker Deployments with probes that point
at real endpoints, a grace period longer than the worker's, and commands that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.__main__ import parser

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
