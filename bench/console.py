"""The console with 100,000 tasks in one queue: how long each page takes to render, in-process.

`python -m bench.console <postgresql://... fresh database>` migrates it, loads the tasks (most
completed, their finish times over the last hour; available ones; the dead letters the oldest, so
filtered pages walk the most rows), and times each page through the Quart test client with an
operator session: the server's own time (queries and templates), without TLS or a browser.
Prints one JSON object: {page: {"max_ms", "median_ms"}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import asyncpg
from cryptography.fernet import Fernet

from bench import preload
from bench.server import sqlalchemy_uri


async def measure(uri: str, *, n: int, repeats: int) -> dict[str, Any]:
    from app import create_app
    from app.settings import load_settings
    from app.src.api.auth import operators
    from app.ui import session

    conn = await asyncpg.connect(uri)
    try:
        client, queue_id = await preload.queue(conn, name="bench")
        dead = n // 20
        await preload.tasks(conn, client=client, queue_id=queue_id, n=dead, status="discarded")
        await preload.tasks(conn, client=client, queue_id=queue_id, n=n - 2 * dead, status="completed")
        await preload.tasks(conn, client=client, queue_id=queue_id, n=dead, status="available")
        await conn.execute(
            "UPDATE tasks SET finished_at = now() - make_interval(secs => random() * 3500), "
            "started_at = now() - interval '1 hour', run_at = now() - interval '1 hour' "
            "WHERE status = 'completed'"
        )
        await conn.execute("UPDATE tasks SET last_error = 'RuntimeError: boom' WHERE status = 'discarded'")
        await conn.execute("ANALYZE tasks")
        task_id = await conn.fetchval("SELECT id FROM tasks WHERE status = 'discarded' LIMIT 1")
    finally:
        await conn.close()

    settings = load_settings(
        APP_ENV="test",
        DB_URI=sqlalchemy_uri(uri),
        SECRET_KEYS=[Fernet.generate_key().decode()],
        ROLES=["api"],
        LOG_LEVEL="WARNING",
    )
    app = create_app(settings)
    pages = {
        "overview": "/ui/",
        "queue": f"/ui/queues/{queue_id}",
        "tasks": "/ui/tasks",
        "tasks by queue and kind": "/ui/tasks?queue=bench&kind=noop",
        "dead letters (the oldest rows)": "/ui/dead-letters",
        "task": f"/ui/tasks/{task_id}",
        "bulk retry confirmation (count)": "/ui/tasks/bulk/retry?status=discarded",
    }
    results: dict[str, Any] = {}
    async with app.test_app():
        db = app.extensions["taskgate"].db
        operator = await operators.create_operator(
            db, email="bench@example.com", password="bench password 123"
        )
        grant = await operators.start_session(db, user_id=operator.user_id)
        async with app.app_context():
            cookie = session.pack(
                session.BrowserSession(grant.access_token, int(grant.expires_at.timestamp()))
            )
        http = app.test_client(use_cookies=False)
        headers = {"Cookie": f"{session.SESSION_COOKIE}={cookie}"}
        for name, path in pages.items():
            timings = []
            for _ in range(repeats + 1):  # the first one warms caches and is not counted
                started = time.perf_counter()
                response = await http.get(path, headers=headers, scheme="https")
                await response.get_data()
                timings.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}")
            counted = timings[1:]
            results[name] = {
                "max_ms": round(max(counted), 1),
                "median_ms": round(statistics.median(counted), 1),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("uri")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from app.src.database import migrations

    migrations.upgrade(sqlalchemy_uri(args.uri))  # before the loop: alembic's env runs its own
    print(json.dumps(asyncio.run(measure(args.uri, n=args.tasks, repeats=args.repeats))))


if __name__ == "__main__":
    main()
