"""The benchmark database server: the embedded PostgreSQL wheel, durable, as `make run` runs it
(its one setting: autovacuum every 10 s, app/src/database/embedded.py SERVER_SETTINGS).

Every system measured here runs against the same server, one fresh database per run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from app.src.database import embedded

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "var" / "bench"


def run_json(args: list[str], **kwargs: Any) -> dict[str, Any]:
    """`python ARGS` from the repository root; its last stdout line, read as JSON."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def sqlalchemy_uri(uri: str) -> str:
    """postgresql://... as Taskgate's DB_URI (postgresql+asyncpg://...)."""
    return uri.replace("postgresql://", "postgresql+asyncpg://", 1)


class BenchServer:
    def __init__(self) -> None:
        self.handle: Any = None
        self.admin_uri = ""

    def start(self) -> BenchServer:
        self.handle, uri = embedded.start(DATA_DIR)
        self.admin_uri = uri.replace("postgresql+asyncpg://", "postgresql://", 1)
        return self

    @property
    def socket_dir(self) -> str:
        return self.admin_uri.split("host=", 1)[1]

    def uri(self, database: str, *, driver: str = "postgresql") -> str:
        return self.admin_uri.replace(f"/{embedded.DATABASE}?", f"/{database}?").replace(
            "postgresql://", f"{driver}://", 1
        )

    def fresh_database(self, name: str) -> str:
        async def recreate() -> None:
            conn = await asyncpg.connect(self.admin_uri)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(recreate())
        return self.uri(name)

    def drop_database(self, name: str) -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(self.admin_uri)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        asyncio.run(drop())
