"""The Grafana dashboard and the Prometheus alert rules in docs/monitoring/ use metrics Taskgate
exports, and the rules pass promtool (its checks and the rule unit tests beside them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import app.src.utils.metrics  # noqa: F401  # registers every metric

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
METRIC = re.compile(r"\btaskgate_[a-z_]+")


def exported() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("taskgate_"):
            names.add(family.name)
            names.update(s.name for s in family.samples)
    # series of labelled families appear once a label set exists; their sample names are these
    for family in list(names):
        names.update(f"{family}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
    return names


def expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "taskgate-alerts.yml").read_text())
    return exprs + [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_and_rules_name_only_metrics_taskgate_exports() -> None:
    known = exported()
    used = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert used, "no metric found in the dashboard or the rules"
    assert used <= known, f"not exported by Taskgate: {sorted(used - known)}"
    # the alerts the README promises
    names = {r["alert"] for g in yaml.safe_load((MONITORING / "taskgate-alerts.yml").read_text())["groups"]
             for r in g["rules"]}  # fmt: skip
    assert {"TaskgateQueueStuck", "TaskgateDeadLettersRising", "TaskgateStartLagHigh",
            "TaskgateSchedulerNotSucceeding"} <= names  # fmt: skip


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: install Debian's prometheus package (apt-get install -y prometheus)")
    for args in (["check", "rules", "taskgate-alerts.yml"], ["test", "rules", "taskgate-alerts.test.yml"]):
        result = subprocess.run(
            [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
