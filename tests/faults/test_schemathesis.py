"""Schemathesis over the served /openapi.json, against the real server process with a real key.

Promises: 0 server errors, 0 response-schema violations (every check of schemathesis runs unless
it is excluded below with the reason), bounded examples, stateful links where the document has
them. The run's reports (JUnit, NDJSON) are kept in tests/faults/results/schemathesis/.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.procs import Deployment, create_api_key
from tests.faults.report import Promises

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

REPORT_DIR = Path(__file__).parent / "results" / "schemathesis"
MAX_EXAMPLES = 100  # per operation and phase: the whole run stays within ~2-3 minutes on 2 cores
SCOPES = ["tasks:read", "tasks:write", "queues:admin", "schedules:admin", "clients:admin"]


async def test_schemathesis_over_openapi(deployment: Deployment) -> None:
    promises = Promises("schemathesis")
    server = deployment.server("fuzz", roles="api")
    await deployment.ready(server)
    key = await asyncio.to_thread(create_api_key, deployment, "fuzz", SCOPES)
    shutil.rmtree(REPORT_DIR, ignore_errors=True)
    REPORT_DIR.mkdir(parents=True)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--tls-verify",
        str(deployment.cert),
        "--checks",
        "all",
        # positive_data_acceptance (ST202) is not applicable here: whether a schema-valid request
        # can be accepted depends on server state the document cannot express (the kinds a client
        # may enqueue, opaque pagination cursors, the destination policy of `http` tasks), so it
        # answers 422 by design. Every other check runs, including response schema conformance,
        # documented status codes and authentication.
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261201",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(REPORT_DIR),
        "--no-color",
        "--output-truncate",
        "false",
    ]
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=REPORT_DIR, capture_output=True, text=True, timeout=360, check=False
    )
    output = result.stdout + result.stderr
    (REPORT_DIR / "output.txt").write_text(output)
    summary = output.rsplit("SUMMARY", 1)[-1]
    kinds = {name.strip(): int(n) for name, n in re.findall(r"(ST\d+ [^:\n]+): (\d+)", summary)}
    generated = re.search(r"(\d+) generated", summary)
    promises.record(
        exit_code=result.returncode,
        failures=sum(kinds.values()),
        failure_kinds=kinds,
        test_cases=int(generated.group(1)) if generated else None,
        **{"500s": sum(n for name, n in kinds.items() if "Server error" in name)},
        schema_violations=sum(n for name, n in kinds.items() if "schema" in name.lower()),
        runtime_errors=summary.count("Runtime Error"),
    )
    promises.check(
        result.returncode == 0, f"schemathesis exited {result.returncode}; see {REPORT_DIR}/output.txt"
    )
    promises.verify()
