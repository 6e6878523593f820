"""The Python SDK, installed into a fresh virtual environment outside the repository, against the
real server over HTTPS: a client enqueues, waits and streams events; remote worker processes run
tasks exactly once, survive SIGKILL without losing any, and have stale completions refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.database import Database
from app.settings import load_settings
from app.src.api.models.auth import IssuedKey
from tests.conftest import ROOT, TEST_SETTINGS, make_client, truncate_all
from tests.e2e.conftest import ServerProcess, start_server
from tests.task_harness import eventually, fetch

pytestmark = pytest.mark.timeout(180)

WORKER_MODULE = """
import os, time
from pydantic import BaseModel
import asyncio
from taskgate import Client, PermanentError, RetryLater, TaskCancelled, Worker

tg = Client(os.environ["TG_URL"], api_key=os.environ["TG_KEY"], verify=os.environ["TG_CA"])
worker = Worker(tg, concurrency=int(os.environ.get("TG_CONCURRENCY", "50")), name=os.environ["TG_NAME"])


class Square(BaseModel):
    n: int


class Squared(BaseModel):
    square: int


class Slow(BaseModel):
    seconds: float


def record(ctx):
    with open(os.environ["TG_RECORD"], "a") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\\n")


@worker.kind("e2e.square", payload=Square, result=Squared)
async def square(ctx, payload: Square) -> Squared:
    record(ctx)
    return Squared(square=payload.n * payload.n)


@worker.kind("e2e.slow", payload=Slow)
def slow(ctx, payload: Slow) -> dict:
    record(ctx)  # a sync handler: it runs in the worker's thread pool
    if ctx.attempt == 1:
        time.sleep(payload.seconds)
    return {"attempt": ctx.attempt}


@worker.kind("e2e.bad_result", payload=Square, result=Squared)
async def bad_result(ctx, payload: Square) -> dict:
    return {"square": "not a number"}


@worker.kind("e2e.flaky", payload=Square)
async def flaky(ctx, payload: Square) -> dict:
    if ctx.attempt < 2:
        raise RetryLater("not yet", after_s=0)
    return {"attempt": ctx.attempt}


@worker.kind("e2e.refuses", payload=Square)
async def refuses(ctx, payload: Square) -> dict:
    raise PermanentError(f"account {payload.n} is closed")


@worker.kind("e2e.waits_sync", payload=Slow)
def waits_sync(ctx, payload: Slow) -> dict:
    if ctx.wait_cancelled(payload.seconds):  # a thread that watches for a cancel request
        raise TaskCancelled("stopped when asked")
    return {"cancelled": False}


@worker.kind("e2e.waits_async", payload=Slow)
async def waits_async(ctx, payload: Slow) -> dict:
    await asyncio.sleep(payload.seconds)  # interrupted by a cancel request
    return {"cancelled": False}
"""

CLIENT_SCRIPT = """
import json, os, time
from taskgate import ApiError, Client

tg = Client(os.environ["TG_URL"], api_key=os.environ["TG_KEY"], verify=os.environ["TG_CA"])
other = Client(os.environ["TG_URL"], api_key=os.environ["TG_OTHER_KEY"], verify=os.environ["TG_CA"])
out = {}

noop = tg.enqueue("noop", {})
out["noop"] = tg.wait(noop.id, timeout_s=30).status
task = tg.enqueue("e2e.square", {"n": 7}, idempotency_key="square-7")
out["same_key_same_task"] = tg.enqueue("e2e.square", {"n": 7}, idempotency_key="square-7").id == task.id
out["events"] = [event.status for event in tg.events(task.id)]
done = tg.wait(task.id, timeout_s=30)
out["square"] = [done.status, done.result]
out["attempts"] = [a.outcome for a in tg.attempts(task.id)]
flaky = tg.enqueue("e2e.flaky", {"n": 1})
flaky_done = tg.wait(flaky.id, timeout_s=30)
out["flaky"] = [flaky_done.status, flaky_done.attempts]
many = tg.enqueue_many([{"kind": "e2e.square", "payload": {"n": i}} for i in range(3)])
out["many"] = [tg.wait(t.id, timeout_s=30).result["square"] for t in many]
page = tg.list(kind="e2e.square", limit=2)
every = list(tg.iter_tasks(kind="e2e.square", page_size=2))
out["paged"] = [len(page.items), page.next_cursor is not None, len(every)]
try:
    tg.enqueue("e2e.square", {"n": "seven"})
except ApiError as exc:
    out["bad_payload"] = [exc.status, [e["field"] for e in exc.errors]]
bad = tg.enqueue("e2e.bad_result", {"n": 2}, max_attempts=1)
bad_done = tg.wait(bad.id, timeout_s=30)
out["bad_result"] = [bad_done.status, bad_done.last_error]
refused = tg.wait(tg.enqueue("e2e.refuses", {"n": 3}).id, timeout_s=30)
out["refused"] = [refused.status, refused.attempts, refused.last_error]
waiting = [tg.enqueue(kind, {"seconds": 60}) for kind in ("e2e.waits_sync", "e2e.waits_async")]
for t in waiting:
    while tg.get(t.id).status != "running":
        time.sleep(0.05)
    tg.cancel(t.id)
out["cancelled"] = [tg.wait(t.id, timeout_s=30).status for t in waiting]
kinds = {k.name: k.remote for k in tg.kinds()}
out["kinds"] = [kinds.get("e2e.square"), kinds.get("noop")]
out["workers"] = sorted(w.name for w in tg.workers() if w.remote)
out["other_kinds"] = "e2e.square" in {k.name for k in other.kinds()}
try:
    other.get(task.id)
except ApiError as exc:
    out["other_get"] = exc.status
try:
    other.enqueue("e2e.square", {"n": 1})
except ApiError as exc:
    out["other_enqueue"] = exc.status
keyed = tg.enqueue("e2e.square", {"n": 3}, concurrency_key="acct-1")
out["keyed"] = [keyed.concurrency_key, tg.wait(keyed.id, timeout_s=30).status]
first = tg.enqueue("noop", {}, debounce={"key": "digest", "period_s": 30})
again = tg.enqueue("noop", {}, debounce={"key": "digest", "period_s": 30})
out["debounced"] = [first.debounced, again.debounced, again.id == first.id]
out["blocked_by"] = [b.reason for b in tg.get(first.id).blocked_by or []]
print(json.dumps(out))
"""


@dataclass
class Sdk:
    python: Path
    scripts: Path


@pytest.fixture(scope="session")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Sdk:
    """One fresh virtual environment per session, outside the repository, with `pip install` of
    a copy of sdk/python (uv when it is there: fast, and offline from its cache)."""
    base = tmp_path_factory.mktemp("sdk")
    source = base / "taskgate-sdk"
    shutil.copytree(ROOT / "sdk" / "python", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = base / "venv"
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if Path(uv).exists():
        subprocess.run([uv, "venv", "-q", str(venv), "--python", sys.executable], check=True)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(source)], check=True
        )
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)], check=True)
    scripts = base / "project"  # the user's own project: no Taskgate checkout on its path
    scripts.mkdir()
    (scripts / "e2e_worker.py").write_text(textwrap.dedent(WORKER_MODULE))
    (scripts / "client_script.py").write_text(textwrap.dedent(CLIENT_SCRIPT))
    return Sdk(venv / "bin" / "python", scripts)


@dataclass
class Platform:
    server: ServerProcess
    db: Database
    database_uri: str

    async def client_key(self, name: str) -> IssuedKey:
        return await make_client(self.db, name)


@pytest.fixture(scope="module")
async def platform(
    database_uri: str, secret_keys: list[str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """One server (api, worker, scheduler) for this module: each test acts as its own tenants,
    so they share it safely and the suite pays for one start-up."""
    await truncate_all(database_uri)
    data_dir = tmp_path_factory.mktemp("sdk-platform")
    settings = load_settings(
        **TEST_SETTINGS, DB_URI=database_uri, SECRET_KEYS=secret_keys, DATA_DIR=data_dir, ROLES=["api"]
    )
    database = Database(settings)
    await database.connect()
    env = {"LEASE_SECONDS": "3", "RESCUE_INTERVAL_S": "0.5", "WORKER_POLL_INTERVAL_S": "0.2"}
    server = start_server(database_uri, data_dir / "server", roles="api,worker,scheduler", env=env)
    try:
        yield Platform(server, database, database_uri)
    finally:
        server.stop()
        await database.disconnect()


def sdk_env(server: ServerProcess, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SECRET_", "APP_", "PYTHON"))}
    env.update(TG_URL=server.base_url, TG_KEY=key, TG_CA=str(server.data_dir / "tls" / "cert.pem"), **extra)
    return env


def spawn_worker(
    sdk: Sdk, server: ServerProcess, key: str, name: str, record: Path
) -> subprocess.Popen[bytes]:
    log = (record.parent / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            [str(sdk.python), "-m", "taskgate", "worker", "e2e_worker:worker"],
            cwd=sdk.scripts,
            env=sdk_env(server, key, TG_NAME=name, TG_RECORD=str(record)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


async def registered(platform: Platform, client: IssuedKey) -> None:
    """Until the worker registered its seven kinds for this client."""

    async def check() -> bool:
        rows = await fetch(
            platform.database_uri,
            "SELECT count(*) AS n FROM remote_kinds WHERE client_id = $1",
            client.client_id,
        )
        return bool(rows[0]["n"] == 7)

    await eventually(check, timeout=30)


def stop(*workers: subprocess.Popen[bytes]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()


async def test_the_sdk_enqueues_waits_streams_and_a_remote_worker_runs_typed_kinds(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    issued = await platform.client_key("sdk user")
    key = issued.api_key
    other_key = (await platform.client_key("another tenant")).api_key
    worker = spawn_worker(sdk, platform.server, key, "worker-a", tmp_path / "record.txt")
    try:
        await registered(platform, issued)
        result = subprocess.run(
            [str(sdk.python), "client_script.py"],
            cwd=sdk.scripts,
            env=sdk_env(platform.server, key, TG_OTHER_KEY=other_key),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
    finally:
        stop(worker)
    assert out["noop"] == "completed"
    assert out["same_key_same_task"] is True
    assert out["events"][-1] == "completed"
    assert out["square"] == ["completed", {"square": 49}]
    assert out["attempts"] == ["completed"]
    assert out["flaky"] == ["completed", 2]
    assert out["many"] == [0, 1, 4]
    assert out["paged"][:2] == [2, True]
    assert out["paged"][2] >= 4
    assert out["bad_payload"] == [422, ["payload.n"]]
    assert out["bad_result"][0] == "discarded"
    assert "result does not match" in out["bad_result"][1]
    assert out["refused"] == ["discarded", 1, "account 3 is closed"]
    assert out["cancelled"] == ["cancelled", "cancelled"]  # a sync and an async handler
    assert out["kinds"] == [True, False]
    assert out["workers"] == ["worker-a"]
    assert out["other_kinds"] is False
    assert out["other_get"] == 404
    assert out["other_enqueue"] == 422
    assert out["keyed"] == ["acct-1", "completed"]
    assert out["debounced"] == [False, True, True]
    assert out["blocked_by"] == ["run_at"]
    assert worker.returncode == 0, (tmp_path / "worker-a.log").read_text()


async def test_two_remote_workers_run_a_thousand_tasks_exactly_once(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    issued = await platform.client_key("sdk user")
    key = issued.api_key
    record = tmp_path / "record.txt"
    workers = [spawn_worker(sdk, platform.server, key, f"worker-{i}", record) for i in (1, 2)]
    try:
        await registered(platform, issued)
        script = (
            "import os\nfrom taskgate import Client\n"
            "tg = Client(os.environ['TG_URL'], api_key=os.environ['TG_KEY'], verify=os.environ['TG_CA'])\n"
            "tg.enqueue_many([{'kind': 'e2e.square', 'payload': {'n': i}} for i in range(1000)])\n"
        )
        subprocess.run(
            [str(sdk.python), "-c", script], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True
        )

        async def all_done() -> bool:
            rows = await fetch(
                platform.database_uri,
                "SELECT count(*) AS n FROM tasks WHERE client_id = $1 AND status = 'completed'",
                issued.client_id,
            )
            return rows[0]["n"] == 1000

        await eventually(all_done, timeout=90, interval=0.2)
    finally:
        stop(*workers)
    lines = [line.split() for line in record.read_text().splitlines()]
    runs = Counter(task_id for task_id, _, _ in lines)
    assert len(runs) == 1000
    assert set(runs.values()) == {1}  # exactly once
    assert len({pid for _, _, pid in lines}) == 2  # both processes took part


async def test_a_sigkilled_remote_worker_loses_nothing_and_its_stale_completion_is_refused(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    issued = await platform.client_key("sdk user")
    key = issued.api_key
    record = tmp_path / "record.txt"
    first = spawn_worker(sdk, platform.server, key, "doomed", record)
    second = None
    try:
        await registered(platform, issued)
        script = (
            "import os\nfrom taskgate import Client\n"
            "tg = Client(os.environ['TG_URL'], api_key=os.environ['TG_KEY'], verify=os.environ['TG_CA'])\n"
            "print(tg.enqueue('e2e.slow', {'seconds': 60}).id)\n"
        )
        done = subprocess.run(
            [str(sdk.python), "-c", script], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True,
            capture_output=True,
        )  # fmt: skip
        task_id = done.stdout.decode().strip()
        await eventually(lambda: record.exists() and task_id in record.read_text(), timeout=30)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = spawn_worker(sdk, platform.server, key, "survivor", record)

        async def completed() -> bool:
            rows = await fetch(
                platform.database_uri, "SELECT status, attempts FROM tasks WHERE id = $1::uuid", task_id
            )
            return (rows[0]["status"], rows[0]["attempts"]) == ("completed", 2)

        await eventually(completed, timeout=60, interval=0.2)
        # the killed worker's attempt comes back late: refused, and the task is untouched
        stale = (
            "import asyncio, json, os\nfrom taskgate import AsyncClient\n"
            "async def main():\n"
            "    async with AsyncClient(os.environ['TG_URL'], api_key=os.environ['TG_KEY'],"
            " verify=os.environ['TG_CA']) as tg:\n"
            f"        answers = await tg.complete([{{'id': '{task_id}', 'attempt': 1, 'outcome': 'failed',"
            " 'error': 'late'}], worker={'name': 'doomed'})\n"
            "        now = await tg.get(answers[0].id)\n"
            "        print(json.dumps([a.accepted for a in answers] + [now.status]))\n"
            "asyncio.run(main())\n"
        )
        late = subprocess.run(
            [str(sdk.python), "-c", stale], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True,
            capture_output=True,
        )  # fmt: skip
        assert json.loads(late.stdout) == [False, "completed"]
    finally:
        stop(*(w for w in (first, second) if w is not None))
    attempts = [line.split()[1] for line in record.read_text().splitlines() if line.startswith(task_id)]
    assert attempts == ["1", "2"]
    outcomes = await fetch(
        platform.database_uri,
        "SELECT outcome FROM task_attempts WHERE task_id = $1::uuid ORDER BY id",
        task_id,
    )
    assert [r["outcome"] for r in outcomes] == ["lost", "completed"]


GENERATED_CLIENT_SCRIPT = """
import os, ssl
from tg_generated.client import AuthenticatedClient
from tg_generated.api.default import get_get_task, post_create_task
from tg_generated.models import Problem, TaskIn, TaskInPayload, TaskOut

client = AuthenticatedClient(
    base_url=os.environ["TG_URL"], token=os.environ["TG_KEY"],
    verify_ssl=ssl.create_default_context(cafile=os.environ["TG_CA"]),
)
created = post_create_task.sync_detailed(client=client, body=TaskIn(kind="noop", payload=TaskInPayload()),
                                         idempotency_key="generated-1")
assert created.status_code == 201, created
assert isinstance(created.parsed, TaskOut), created.parsed
read = get_get_task.sync_detailed(created.parsed.id, client=client, wait=10)
assert isinstance(read.parsed, TaskOut) and read.parsed.status.value == "completed", read.parsed
missing = get_get_task.sync_detailed(created.parsed.id, client=AuthenticatedClient(
    base_url=os.environ["TG_URL"], token="tg_0000000000000000_" + "x" * 43,
    verify_ssl=ssl.create_default_context(cafile=os.environ["TG_CA"])))
assert missing.status_code == 401 and isinstance(missing.parsed, Problem), missing
print("ok")
"""


async def test_a_client_generated_from_openapi_enqueues_and_reads_a_task(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """openapi-python-client, in its own environment, generates a client from /openapi.json."""
    base = tmp_path_factory.mktemp("generated")
    venv = base / "venv"
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    subprocess.run([uv, "venv", "-q", str(venv), "--python", sys.executable], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([uv, "pip", "install", "-q", "--python", python, "openapi-python-client"], check=True)
    spec = base / "openapi.json"
    spec.write_bytes(await _openapi(platform.server))
    subprocess.run(
        [str(venv / "bin" / "openapi-python-client"), "generate", "--path", str(spec), "--output-path",
         str(base / "tg_generated"), "--meta", "none"],
        check=True, capture_output=True,
    )  # fmt: skip
    issued = await platform.client_key("generated")
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", textwrap.dedent(GENERATED_CLIENT_SCRIPT)],
        cwd=base, env=sdk_env(platform.server, issued.api_key), capture_output=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().strip() == "ok"


async def _openapi(server: ServerProcess) -> bytes:
    import aiohttp

    connector = aiohttp.TCPConnector(ssl=server.ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{server.base_url}/openapi.json") as response,
    ):
        assert response.status == 200
        return await response.read()
