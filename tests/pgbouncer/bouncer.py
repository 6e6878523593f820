"""Debian's PgBouncer in front of a PgCluster (tests/faults/pg.py): its own config, port and process.

PgBouncer refuses to run as root; as root it runs as the fault suite's system user, like the
PostgreSQL server it fronts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.faults.pg import PgCluster, _system_user

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    return Path(BINARY).exists()


class PgBouncer:
    def __init__(
        self, cluster: PgCluster, database: str, *, port: int, pool_mode: str, pool_size: int = 8
    ) -> None:
        self.port = port
        self.database = database
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.user = _system_user()
        self.root = Path(tempfile.mkdtemp(prefix=f"taskgate-pgbouncer-{pool_mode}-"))
        self.root.chmod(0o755)
        self.log = self.root / "pgbouncer.log"
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            f"""[databases]
{database} = host=127.0.0.1 port={cluster.port} dbname={database} user=postgres
* = host=127.0.0.1 port={cluster.port} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root}/userlist.txt
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 2000
logfile = {self.log}
pidfile = {self.root}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
"""
        )
        if self.user is not None:
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def uri(self, database: str | None = None) -> str:
        """A DB_URI through this PgBouncer: its database, or any other of the server (`*`)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database or self.database}"

    def start(self) -> None:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        self.process = subprocess.Popen(
            [BINARY, str(self.root / "pgbouncer.ini")],
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            **kwargs,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log.read_text() if self.log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("pgbouncer did not listen within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
