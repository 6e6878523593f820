"""`python -m taskgate worker module:worker` as a real process: how it starts and how it stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.timeout(60)

WORKER_MODULE = """
    import os
    from taskgate import Client, Worker

    worker = Worker(Client(os.environ["TG_URL"], api_key="key", verify=False))

    @worker.kind("reports.build")
    def build(ctx, payload):
        return {}
"""


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A server that takes connections and never says a word (not even TLS's first)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener


def test_sigterm_while_the_worker_registers_its_kinds_stops_it_at_once(
    silent_server: socket.socket, tmp_path: Path
) -> None:
    """A worker whose server did not answer its kinds' registration ignored SIGTERM until the
    registration gave up: each send waited its 30 s timeout and was sent again, minutes in all (an
    orchestrator then kills it). A stop asked during start-up now ends it there, exit code 0."""
    (tmp_path / "silent_worker.py").write_text(textwrap.dedent(WORKER_MODULE))
    port = silent_server.getsockname()[1]
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskgate", "worker", "silent_worker:worker"],
        cwd=tmp_path,
        env=subprocess_env(TG_URL=f"https://127.0.0.1:{port}", PYTHONPATH=ROOT / "sdk" / "python"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        silent_server.settimeout(30)
        connection, _ = silent_server.accept()  # the registration is under way (and never answered)
        with connection:
            worker.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                code: int | None = worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                code = None
            stopped_s = time.monotonic() - signalled
    finally:
        if worker.poll() is None:
            worker.kill()
        output = worker.communicate()[0].decode(errors="replace")
    assert code == 0, f"exit code {code} {stopped_s:.1f} s after SIGTERM:\n{output}"
    assert stopped_s < 5, output
