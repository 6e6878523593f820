"""The Python SDK, installed into a fresh virtual environment outside the repository, against the
real server over HTTPS: a client enqueues, waits and streams events; remote worker processes run
tasks exactly once, survive SIGKILL without losing any, and have stale completions refused."""

from __future__ import annotations

import asyncio
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
import asyncio, os, time
from pydantic import BaseModel
from taskgate import ChildFailed, Client, PermanentError, RetryLater, TaskCancelled, Worker

tg = Client(os.environ["TG_URL"], api_key=os.environ["TG_KEY"], verify=os.environ["TG_CA"])
worker = Worker(tg, concurrency=int(os.environ.get("TG_CONCURRENCY", "50")), name=os.environ["TG_NAME"],
                grace_s=float(os.environ.get("TG_GRACE", "30")))


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


# durable composition: the same ctx API as in-process kinds
def mark(line):
    with open(os.environ["TG_RECORD"] + ".durable", "a") as handle:
        handle.write(f"{line} {os.getpid()}\\n")


class Steps(BaseModel):
    hold_s: float = 0


@worker.kind("e2e.steps", payload=Steps)
async def steps(ctx, payload: Steps) -> dict:
    async def three(previous):
        mark(f"{ctx.task_id} three")
        await asyncio.sleep(float(open(os.environ["TG_RECORD"] + ".hold").read()) if os.path.exists(
            os.environ["TG_RECORD"] + ".hold") else payload.hold_s)
        return previous + 1

    one = await ctx.step("one", lambda: (mark(f"{ctx.task_id} one"), 1)[1])
    two = await ctx.step("two", lambda: (mark(f"{ctx.task_id} two"), one + 1)[1])
    return {"results": [one, two, await ctx.step("three", three, two)]}


class Order(BaseModel):
    order_id: int
    notify: int = 3
    fail_notification: int = -1


@worker.kind("e2e.order", payload=Order)
async def order(ctx, payload: Order) -> dict:
    charge = await ctx.step("charge", lambda: {"charged": payload.order_id * 100})
    await ctx.sleep("cool-off", 0.5)
    shipped = await ctx.wait_signal("shipped", timeout_s=60)
    children = [
        await ctx.spawn("e2e.notify", {"n": i, "fail": i == payload.fail_notification}, key=f"notify-{i}")
        for i in range(payload.notify)
    ]
    try:
        sent = await ctx.gather(children)
    except ChildFailed as exc:
        return {"child_failed": exc.key}
    return {"charge": charge, "shipped": shipped, "sent": [s["n"] for s in sent]}


@worker.kind("e2e.step_named_like_a_sleep")
async def step_named_like_a_sleep(ctx, payload: dict) -> dict:
    await ctx.sleep("nap", 0)
    return {"step": await ctx.step("nap", lambda: 42)}  # names are unique per task


class Notify(BaseModel):
    n: int
    fail: bool = False


@worker.kind("e2e.notify", payload=Notify)
async def notify(ctx, payload: Notify) -> dict:
    mark(f"{ctx.task_id} notify-{payload.n}")
    if payload.fail:
        raise PermanentError("the mail server refused it")
    return {"n": payload.n}
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
    sdk: Sdk, server: ServerProcess, key: str, name: str, record: Path, **extra: str
) -> subprocess.Popen[bytes]:
    log = (record.parent / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            [str(sdk.python), "-m", "taskgate", "worker", "e2e_worker:worker"],
            cwd=sdk.scripts,
            env=sdk_env(server, key, TG_NAME=name, TG_RECORD=str(record), **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


async def registered(platform: Platform, client: IssuedKey) -> None:
    """Until the worker registered its kinds for this client."""

    async def check() -> bool:
        rows = await fetch(
            platform.database_uri,
            "SELECT count(*) AS n FROM remote_kinds WHERE client_id = $1",
            client.client_id,
        )
        return bool(rows[0]["n"] == WORKER_MODULE.count("@worker.kind("))

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


async def test_a_sigterm_hands_back_a_last_attempt_whose_handler_it_stopped(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    """A handler still running when the grace ends is cancelled and its task handed back: it is
    available again, not rescued as a failure (with max_attempts 1 that would discard it)."""
    issued = await platform.client_key("sdk sigterm")
    key = issued.api_key
    worker = spawn_worker(sdk, platform.server, key, "stopping", tmp_path / "record.txt", TG_GRACE="0.5")
    try:
        await registered(platform, issued)
        script = (
            "import os\nfrom taskgate import Client\n"
            "tg = Client(os.environ['TG_URL'], api_key=os.environ['TG_KEY'], verify=os.environ['TG_CA'])\n"
            "print(tg.enqueue('e2e.waits_async', {'seconds': 60}, max_attempts=1).id)\n"
        )
        done = subprocess.run(
            [str(sdk.python), "-c", script], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True,
            capture_output=True,
        )  # fmt: skip
        task_id = done.stdout.decode().strip()

        async def status() -> str:
            rows = await fetch(platform.database_uri, "SELECT status FROM tasks WHERE id = $1::uuid", task_id)
            return str(rows[0]["status"])

        async def running() -> bool:
            return await status() == "running"

        await eventually(running, timeout=30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
    finally:
        stop(worker)
    await asyncio.sleep(4.5)  # past the lease (3 s) and a rescue (every 0.5 s): nothing to rescue
    assert await status() == "available"
    outcomes = await fetch(
        platform.database_uri, "SELECT outcome FROM task_attempts WHERE task_id = $1::uuid", task_id
    )
    assert [r["outcome"] for r in outcomes] == ["suspended"]


async def test_a_sigterm_ends_the_worker_process_even_while_a_sync_handler_does_not_return(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    """`Worker.run()` returned after the grace, but the process then waited at exit for the
    handler's thread (the pool's threads are joined at interpreter exit): a sync handler that
    never returns kept a SIGTERMed worker alive until it was killed."""
    issued = await platform.client_key("sdk stuck")
    key = issued.api_key
    record = tmp_path / "record.txt"
    worker = spawn_worker(sdk, platform.server, key, "stuck", record, TG_GRACE="0.5")
    try:
        await registered(platform, issued)
        script = (
            "import os\nfrom taskgate import Client\n"
            "tg = Client(os.environ['TG_URL'], api_key=os.environ['TG_KEY'], verify=os.environ['TG_CA'])\n"
            "print(tg.enqueue('e2e.slow', {'seconds': 120}).id)\n"
        )
        done = subprocess.run(
            [str(sdk.python), "-c", script], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True,
            capture_output=True,
        )  # fmt: skip
        task_id = done.stdout.decode().strip()
        await eventually(lambda: record.exists() and task_id in record.read_text(), timeout=30)
        worker.send_signal(signal.SIGTERM)
        try:
            exited = worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            exited = None
        assert exited == 0, (tmp_path / "stuck.log").read_text()
    finally:
        stop(worker)


DURABLE_SCRIPT = """
import json, os, time
from taskgate import Client

tg = Client(os.environ["TG_URL"], api_key=os.environ["TG_KEY"], verify=os.environ["TG_CA"])
out = {}
early = tg.enqueue("e2e.order", {"order_id": 1})
tg.signal(early.id, "shipped", {"carrier": "ups"})  # before the task reaches its wait
late = tg.enqueue("e2e.order", {"order_id": 2, "notify": 50})
while (tg.get(late.id).waiting_for or {}).get("name") != "shipped":  # it waits for the signal now
    time.sleep(0.05)
tg.signal(late.id, "shipped", {"carrier": "dhl"})
failing = tg.enqueue("e2e.order", {"order_id": 3, "fail_notification": 1})
tg.signal(failing.id, "shipped", None)
out["early"] = tg.wait(early.id, timeout_s=60).result
out["late"] = tg.wait(late.id, timeout_s=60).result
out["failing"] = tg.wait(failing.id, timeout_s=60).result
# depends_on over HTTP with remote kinds: a diamond A -> (B, C) -> D
a = tg.enqueue("e2e.square", {"n": 1})
b = tg.enqueue("e2e.square", {"n": 2}, depends_on=[a.id])
c = tg.enqueue("e2e.square", {"n": 3}, depends_on=[a.id])
d = tg.enqueue("e2e.square", {"n": 4}, depends_on=[b.id, c.id])
done = {name: tg.wait(t.id, timeout_s=60) for name, t in zip("abcd", (a, b, c, d))}
out["diamond_in_order"] = (
    done["a"].finished_at <= done["b"].started_at and done["a"].finished_at <= done["c"].started_at
    and max(done["b"].finished_at, done["c"].finished_at) <= done["d"].started_at
)
out["diamond"] = [done[n].status for n in "abcd"]
out["steps"] = [s["name"] for s in tg.steps(early.id)]
named = tg.wait(tg.enqueue("e2e.step_named_like_a_sleep", {}).id, timeout_s=60)
out["step_named_like_a_sleep"] = [named.status, named.last_error]
print(json.dumps(out))
"""


async def test_durable_composition_through_the_sdk_worker(
    sdk: Sdk, platform: Platform, tmp_path: Path
) -> None:
    """The same ctx API in remote workers: steps survive a SIGKILL, sleep, signals before and
    after the wait, fan-out and gather, ChildFailed, and depends_on, all through the SDK."""
    issued = await platform.client_key("sdk user")
    key = issued.api_key
    record = tmp_path / "record.txt"
    durable_marks = Path(str(record) + ".durable")
    hold = Path(str(record) + ".hold")
    hold.write_text("60")
    workers = [spawn_worker(sdk, platform.server, key, f"durable-{i}", record) for i in (1, 2)]
    try:
        await registered(platform, issued)
        (sdk.scripts / "durable_script.py").write_text(textwrap.dedent(DURABLE_SCRIPT))
        result = subprocess.run(
            [str(sdk.python), "durable_script.py"], cwd=sdk.scripts, env=sdk_env(platform.server, key),
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)

        script = (
            "import os\nfrom taskgate import Client\n"
            "tg = Client(os.environ['TG_URL'], api_key=os.environ['TG_KEY'], verify=os.environ['TG_CA'])\n"
            "tg.put_queue('steps', min_backoff_s=0.05, max_backoff_s=0.1)\n"
            "print(tg.enqueue('e2e.steps', {}, queue='steps').id)\n"
        )
        enqueued = subprocess.run(
            [str(sdk.python), "-c", script], cwd=sdk.scripts, env=sdk_env(platform.server, key), check=True,
            capture_output=True,
        )  # fmt: skip
        task_id = enqueued.stdout.decode().strip()

        def three_started() -> list[str]:
            text = durable_marks.read_text() if durable_marks.exists() else ""
            return [line for line in text.splitlines() if line.startswith(f"{task_id} three")]

        started_three = await eventually(three_started, timeout=30)
        victim = next(w for w in workers if w.pid == int(started_three[0].split()[2]))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        hold.write_text("0")

        async def completed() -> bool:
            rows = await fetch(platform.database_uri, "SELECT status FROM tasks WHERE id = $1::uuid", task_id)
            return bool(rows[0]["status"] == "completed")

        await eventually(completed, timeout=60, interval=0.2)
    finally:
        stop(*workers)
    assert out["early"] == {"charge": {"charged": 100}, "shipped": {"carrier": "ups"}, "sent": [0, 1, 2]}
    assert out["late"] == {"charge": {"charged": 200}, "shipped": {"carrier": "dhl"}, "sent": list(range(50))}
    assert out["failing"] == {"child_failed": "notify-1"}
    assert out["diamond"] == ["completed"] * 4
    assert out["diamond_in_order"] is True
    assert out["steps"] == ["charge", "cool-off"]  # the signal came before the wait: no wait was recorded
    status, error = out["step_named_like_a_sleep"]
    assert status == "discarded", error  # not completed with the sleep's record as the step's result
    assert "has the name of a sleep or signal wait" in error
    marks = Counter(" ".join(line.split()[:2]) for line in durable_marks.read_text().splitlines())
    assert [marks[f"{task_id} {step}"] for step in ("one", "two", "three")] == [1, 1, 2]
    notified = [m for m in marks if "notify-" in m]
    assert len(notified) == 3 + 50 + 3
    assert {marks[m] for m in notified} == {1}  # each child ran once
    rows = await fetch(platform.database_uri, "SELECT result FROM tasks WHERE id = $1::uuid", task_id)
    assert json.loads(rows[0]["result"]) == {"results": [1, 2, 3]}


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
