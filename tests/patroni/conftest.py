"""The Patroni suite (`make test-patroni`): Taskgate's processes on a three-node Patroni cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.faults.procs import subprocess_env


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [sys.executable, "-m", "app", "dev-cert", "--dir", str(directory)],
        cwd=ROOT,
        env=subprocess_env(APP_ENV="test"),
        check=True,
        capture_output=True,
    )
    return directory / "cert.pem", directory / "key.pem"
