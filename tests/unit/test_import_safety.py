"""Seed 000: importing the package and building the app starts nothing."""

import subprocess
import sys
import textwrap

from tests.conftest import ROOT, subprocess_env

PROBE = textwrap.dedent(
    """
    import socket, threading, asyncio
    opened = []
    real_connect = socket.socket.connect
    def spy(self, *args):
        opened.append(args)
        return real_connect(self, *args)
    socket.socket.connect = spy
    threads_before = {t.name for t in threading.enumerate()}

    import app
    from app.settings import load_settings
    application = app.create_app(load_settings(APP_ENV="test", DB_URI="postgresql+asyncpg://u@127.0.0.1:1/x"))

    runtime = application.extensions["taskgate"]
    new_threads = {t.name for t in threading.enumerate()} - threads_before
    assert not opened, f"sockets connected at import: {opened}"
    assert not new_threads, f"threads started at import: {new_threads}"
    assert runtime.started is False
    try:
        runtime.db
    except RuntimeError:
        pass
    else:
        raise AssertionError("a database exists before serving")
    import sqlalchemy.pool
    print("IMPORT-SAFE")
    """
)


def test_import_and_create_app_open_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=subprocess_env(APP_ENV="test"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORT-SAFE" in result.stdout
