"""The real server process: HTTPS only, ready, problem+json, clean stop, and prod's refusals."""

import signal
import ssl
import subprocess
import sys
import warnings

import aiohttp
import pytest

from tests.conftest import ROOT, subprocess_env
from tests.e2e.conftest import ServerProcess, wait_ready


async def test_serves_ready_over_verified_https(server: ServerProcess, https: aiohttp.ClientSession) -> None:
    await wait_ready(https)
    async with https.get("/api/common/ready") as response:
        assert response.status == 200
        assert (await response.json())["ready"] is True
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        assert response.headers["X-Request-Id"]
    async with https.get("/api/unknown") as response:
        assert response.status == 404
        assert response.content_type == "application/problem+json"
    async with https.get("/openapi.json") as response:
        assert (await response.json())["openapi"].startswith("3.")


async def test_refuses_plain_http_and_old_tls(server: ServerProcess, https: aiohttp.ClientSession) -> None:
    await wait_ready(https)
    port = int(server.base_url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{port}/api/common/health") as response:
                await response.read()
    tls12 = server.ssl_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls12)) as modern,
        modern.get(f"{server.base_url}/api/common/health") as response,
    ):
        assert response.status == 200
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(server.data_dir / "tls" / "cert.pem"))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=old)) as legacy:
        with pytest.raises(aiohttp.ClientError):
            async with legacy.get(f"{server.base_url}/api/common/health") as response:
                await response.read()


def test_sigterm_stops_cleanly_with_exit_0(server: ServerProcess) -> None:
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log()
    assert "runtime stopped" in server.log()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "DB_URI"),
        ({"DB_URI": "postgresql+asyncpg://x@127.0.0.1:1/x"}, "SECRET_KEYS"),
        (
            {
                "DB_URI": "postgresql+asyncpg://x@127.0.0.1:1/x",
                "SECRET_KEYS": "SfkNBxE3pbOLVVqDc4Z5iwTY26wP6J2vn46qXL6ogQc=",
            },
            "SSL_CERTFILE",
        ),
        (  # a certificate that is not there (a volume not mounted) once ended in a traceback
            {
                "DB_URI": "postgresql+asyncpg://x@127.0.0.1:1/x",
                "SECRET_KEYS": "SfkNBxE3pbOLVVqDc4Z5iwTY26wP6J2vn46qXL6ogQc=",
                "SSL_CERTFILE": "/nonexistent/cert.pem",
                "SSL_KEYFILE": "/nonexistent/key.pem",
            },
            "SSL_CERTFILE=/nonexistent/cert.pem",
        ),
    ],
)
def test_production_without_secrets_exits_with_one_line(env: dict[str, str], named: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env=subprocess_env(APP_ENV="prod", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_help_explains_each_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for command in ("serve", "worker", "migrate", "dev-cert"):
        assert command in result.stdout
    serve = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "--roles" in serve.stdout
