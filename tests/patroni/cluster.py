"""A Patroni cluster on this machine: one etcd (v2 API, which Debian's patroni speaks through
python3-etcd) and three PostgreSQL 15 nodes, each run by its own `patroni` process.

Everything runs as the fault suite's system user (PostgreSQL refuses root), in one temporary
directory; `destroy()` kills what is left. Members, roles and lag come from Patroni's REST API.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.faults.pg import SYSTEM_BIN, _system_user
from tests.faults.procs import free_port

PATRONI = shutil.which("patroni") or "/usr/bin/patroni"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
SCOPE = "taskgate"


def available() -> str | None:
    """None when the cluster can run here, else what is missing."""
    missing = [str(p) for p in (PATRONI, ETCD, SYSTEM_BIN / "postgres") if not Path(p).exists()]
    return ", ".join(missing) or None


@dataclass
class Node:
    name: str
    pg_port: int
    api_port: int
    config: Path
    data: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def postmaster_pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pid_file.read_text().splitlines()[0])
        return None


class PatroniCluster:
    def __init__(self, *, nodes: int = 3, synchronous_mode: bool = True, ttl: int = 10) -> None:
        self.user = _system_user()
        self.root = Path(tempfile.mkdtemp(prefix="taskgate-patroni-"))
        self.root.chmod(0o755)
        self.synchronous_mode = synchronous_mode
        self.ttl = ttl
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        self.nodes = [self._node(f"pg{i + 1}") for i in range(nodes)]
        self._chown(self.root)

    # --- set-up ----------------------------------------------------------------------------------

    def _chown(self, path: Path) -> None:
        if self.user is None:
            return
        for item in (path, *path.rglob("*")):
            os.chown(item, self.user.pw_uid, self.user.pw_gid)

    def _node(self, name: str) -> Node:
        home = self.root / name
        home.mkdir()
        node = Node(name, free_port(), free_port(), home / "patroni.yml", home / "data", home / "patroni.log")
        # JSON is YAML: the config without a YAML writer
        config: dict[str, Any] = {
            "scope": SCOPE,
            "name": name,
            "log": {"level": "WARNING"},
            "restapi": {
                "listen": f"127.0.0.1:{node.api_port}",
                "connect_address": f"127.0.0.1:{node.api_port}",
            },
            "etcd": {"host": f"127.0.0.1:{self.etcd_port}", "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": 1,
                    "retry_timeout": 4,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": 300,
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_log_hints": "on",
                            "wal_keep_size": "128MB",
                            "autovacuum_naptime": "10s",  # docs/operations.md
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"username": "postgres"}, {"auth": "trust"}],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 trust",
                    "host all all 127.0.0.1/32 trust",
                ],
                "users": {},
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.data),
                "bin_dir": str(SYSTEM_BIN),
                "pgpass": str(home / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "postgres", "password": "postgres"},
                },
                "parameters": {"unix_socket_directories": str(home), "log_min_messages": "warning"},
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }
        node.config.write_text(json.dumps(config, indent=2))
        return node

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": str(self.root)}
        handle = log.open("ab")
        try:
            return subprocess.Popen(
                args, cwd=self.root, env=env, stdout=handle, stderr=subprocess.STDOUT, **kwargs
            )
        finally:
            handle.close()
            self._chown(log)

    def start(self, timeout: float = 120) -> None:
        etcd_dir = self.root / "etcd"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = self._spawn(
            [
                ETCD, "--name", "etcd1", "--data-dir", str(etcd_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd1={peer}", "--enable-v2=true",
            ],
            self.root / "etcd.log",
        )  # fmt: skip
        _wait_port(self.etcd_port, timeout=30)
        for node in self.nodes:
            self.start_node(node)
            if node is self.nodes[0]:
                self.wait_for(lambda: self.leader() is not None, timeout, "no leader was elected")
        self.wait_healthy(timeout)

    def start_node(self, node: Node) -> None:
        node.process = self._spawn([PATRONI, str(node.config)], node.log)

    # --- state -----------------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        for node in self.nodes:
            url = f"http://127.0.0.1:{node.api_port}/cluster"
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as answer:  # nosec B310
                return list(json.loads(answer.read())["members"])
        return []

    def leader(self) -> Node | None:
        for member in self.members():
            if member["role"] == "leader" and member["state"] == "running":
                return self.node(member["name"])
        return None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def sync_standby(self) -> Node | None:
        for member in self.members():
            if member["role"] == "sync_standby" and member["state"] in ("running", "streaming"):
                return self.node(member["name"])
        return None

    def wait_healthy(self, timeout: float = 120) -> None:
        """A leader and every other node replicating (one of them synchronously, in sync mode)."""

        def healthy() -> bool:
            members = self.members()
            streaming = [
                m for m in members if m["role"] != "leader" and m["state"] in ("running", "streaming")
            ]
            ok = self.leader() is not None and len(streaming) == len(self.nodes) - 1
            return ok and (not self.synchronous_mode or self.sync_standby() is not None)

        self.wait_for(healthy, timeout, "the cluster did not become healthy")

    def wait_for(self, check: Any, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} within {timeout} s: {self.members()}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {n.name}\n{n.log.read_text(errors='replace')[-tail:]}" for n in self.nodes if n.log.exists()
        )

    def uri(self, database: str) -> str:
        """DB_URI for the service: every node, and only the read-write one will do."""
        hosts = "&".join(f"host=127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql+asyncpg://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def direct_dsn(self, node: Node, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{node.pg_port}/{database}"

    # --- faults ----------------------------------------------------------------------------------

    def switchover(self, candidate: Node) -> float:
        leader = self.leader()
        assert leader is not None
        body = json.dumps({"leader": leader.name, "candidate": candidate.name}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{leader.api_port}/switchover", data=body, method="POST"
        )
        started = time.time()
        with urllib.request.urlopen(request, timeout=60) as answer:  # nosec B310
            assert answer.status == 200, answer.read()
        return started

    def crash(self, node: Node) -> float:
        """kill -9 of the node's patroni and postmaster at once: the machine is gone."""
        pid = node.postmaster_pid()
        at = time.time()
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGKILL)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.process is not None:
            node.process.wait(timeout=10)
        return at

    def destroy(self) -> None:
        for node in self.nodes:
            pid = node.postmaster_pid()
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait(timeout=10)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")
