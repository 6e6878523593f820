"""Deliveries per second of the `http` kind to a local aiohttp sink, against a plain aiohttp loop.

    .venv/bin/python -m bench.http_delivery [--tasks 2000] [--host-limit 10]

One run, two systems, one sink (an aiohttp server on 127.0.0.1 in this process):
- plain: an aiohttp ClientSession sending the same requests with --host-limit of them in flight;
- taskgate: N `http` tasks of a tenant with a signing secret, enqueued in batches while one
  `python -m app worker` process (default settings, HTTP_HOST_MAX_CONCURRENCY = --host-limit)
  drains them; timed from the first insert to the last completion written to PostgreSQL. Every
  delivery is signed (Standard Webhooks); one is verified with the standardwebhooks package.
The database is the embedded server under var/bench (or BENCH_DB_URI). Timing belongs here, not
in tests; the numbers are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web
from standardwebhooks import Webhook

from bench.server import sqlalchemy_uri

ROOT = Path(__file__).resolve().parents[1]
DATABASE = "taskgate_bench_http"
BODY = b'{"event":"order.paid","order":{"id":42,"total":"19.90"}}'
STALL_S = 30.0  # give up when no task completes for this long (and show why)
SECRET_KEY = "zOyp1OqHZ8zvcfnAaflu0J1z4Jx0pcXOm8ZNjPzVumI="  # SECRET_KEYS of the worker: it decrypts the tenant's signing secret


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.sample: tuple[bytes, dict[str, str]] | None = None  # the last signed request
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def receive(request: web.Request) -> web.Response:
            body = await request.read()
            self.count += 1
            if "webhook-signature" in request.headers:
                self.sample = (body, dict(request.headers))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


async def plain(sink: Sink, n: int, in_flight: int) -> float:
    remaining = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def sender() -> None:
            for _ in remaining:
                async with session.post(
                    sink.url, data=BODY, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    assert response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(in_flight)))
        return time.perf_counter() - started


def database() -> str:
    """A migrated database: BENCH_DB_URI, or the embedded server under var/bench."""
    from app.src.database import embedded, migrations

    uri = os.environ.get("BENCH_DB_URI")
    if not uri:
        _server, admin = embedded.start(ROOT / "var" / "bench")
        asyncio.run(embedded.create_database(admin.replace("+asyncpg", ""), DATABASE))
        uri = admin.replace(f"/{embedded.DATABASE}?", f"/{DATABASE}?")
    uri = sqlalchemy_uri(uri)
    migrations.upgrade(uri)
    return uri


async def taskgate(sink: Sink, n: int, host_limit: int, uri: str, log_dir: Path) -> tuple[float, str]:
    from app.src.api.auth.clients import insert_signing_secret
    from app.src.database import queues as queue_store
    from app.src.database import tasks as store
    from app.src.encryption.secrets import SIGNING_SECRET, keyring_for

    conn = await asyncpg.connect(uri.replace("+asyncpg", ""))
    await conn.execute("TRUNCATE tasks, task_attempts, http_host_permits, http_hosts CASCADE")
    tenant = uuid.uuid4()
    ring = keyring_for((SECRET_KEY,))
    record = await insert_signing_secret(conn, ring, client_id=tenant)
    secret = ring.decrypt(SIGNING_SECRET, record.secret)
    queue = await queue_store.ensure(conn, client_id=tenant, name="bench-http")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SECRET_", "APP_", "HTTP_"))}
    env.update(
        APP_ENV="prod",
        DB_URI=uri,
        SECRET_KEYS=SECRET_KEY,
        TLS_TERMINATED_UPSTREAM="true",
        LOG_LEVEL="INFO",  # the worker says "worker started" at INFO; it logs little else
        DATA_DIR=str(log_dir),
        HTTP_ALLOWED_NETWORKS="127.0.0.0/8",
        HTTP_HOST_MAX_CONCURRENCY=str(host_limit),
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        await asyncio.sleep(0.5)
        while not (log_dir / "worker.log").read_text().count("worker started"):
            if worker.poll() is not None:
                raise SystemExit("the worker exited:\n" + (log_dir / "worker.log").read_text())
            await asyncio.sleep(0.1)
        payload = {"url": sink.url, "body": BODY.decode(), "headers": {"Content-Type": "application/json"}}
        started = time.perf_counter()
        for first in range(0, n, 1000):
            batch = [
                store.NewTask(
                    id=uuid.uuid4(),
                    client_id=tenant,
                    queue_id=queue.id,
                    queue=queue.name,
                    kind="http",
                    payload=payload,
                    priority=5,
                    max_attempts=25,
                    run_at=None,
                    delay_s=None,
                )
                for _ in range(min(1000, n - first))
            ]
            await store.insert_tasks(conn, batch)
        progress = (0, time.perf_counter())
        while (completed := await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'")) < n:
            if completed > progress[0]:
                progress = (completed, time.perf_counter())
            elif time.perf_counter() - progress[1] > STALL_S or worker.poll() is not None:
                tail = (log_dir / "worker.log").read_text().splitlines()[-5:]
                raise SystemExit(
                    f"no progress for {STALL_S:.0f} s at {completed}/{n}; worker log:\n" + "\n".join(tail)
                )
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        unexpected = await conn.fetchval("SELECT count(*) FROM tasks WHERE attempts <> 1")
        if unexpected:
            print(f"note: {unexpected} tasks needed more than one attempt", file=sys.stderr)
        return elapsed, secret
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    uri = await asyncio.to_thread(database)
    sink = Sink()
    await sink.start()
    try:
        rows: list[tuple[str, float]] = []
        rows.append(
            (
                f"plain aiohttp loop, {args.host_limit} in flight",
                await plain(sink, args.tasks, args.host_limit),
            )
        )
        before = sink.count
        seconds, secret = await taskgate(
            sink, args.tasks, args.host_limit, uri, ROOT / "var" / "bench" / "http-worker"
        )
        assert sink.count - before == args.tasks, (sink.count - before, args.tasks)
        assert sink.sample is not None, "the deliveries were not signed"
        Webhook(secret).verify(*sink.sample, json_parse=False)
        rows.append((f"taskgate http kind, 1 worker, host limit {args.host_limit}", seconds))
    finally:
        if sink.runner is not None:
            await sink.runner.cleanup()
    print(
        f"\n{args.tasks} POSTs of {len(BODY)} bytes to an aiohttp sink on 127.0.0.1 ({os.cpu_count()} cpus)"
    )
    print(f"{'system':<46} {'seconds':>8} {'deliveries/s':>13}")
    for name, elapsed in rows:
        print(f"{name:<46} {elapsed:>8.2f} {args.tasks / elapsed:>13.0f}")
    ratio = rows[0][1] / rows[1][1]
    print(
        f"taskgate reaches {ratio:.0%} of the plain loop "
        "(each delivery durable, leased, permit-gated and recorded as an attempt)"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_delivery", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tasks", type=int, default=2000, help="deliveries per system (default 2000)")
    parser.add_argument(
        "--host-limit", type=int, default=10, help="requests in flight to the sink (default 10)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
