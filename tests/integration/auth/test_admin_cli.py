"""python -m app admin ...: create-user and create-client print what the SPEC says, once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from quart.typing import TestClientProtocol as Client

from app.__main__ import parser
from app.admin import _run, print_dev_credentials
from app.database import Database
from app.settings import Settings
from app.src.api.auth import clients, operators
from app.src.api.auth.dev import MARKER, issue_dev_credentials
from tests.conftest import ROOT, bearer, subprocess_env
from tests.integration.auth.login_steps import code, log_in

PASSWORD = "a password typed into a pipe"


def admin(settings: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "admin", *args],
        cwd=ROOT,
        input=stdin,
        env=subprocess_env(
            APP_ENV="test",
            DB_URI=settings.DB_URI,
            SECRET_KEYS=",".join(settings.SECRET_KEYS),
            DATA_DIR=settings.DATA_DIR,
            LOG_FORMAT="json",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_create_user_and_client_print_one_json_object(settings: Settings, client: Client) -> None:
    user = admin(settings, "create-user", "--email", "ops@example.com", "--json", stdin=PASSWORD + "\n")
    assert user.returncode == 0, user.stderr
    created = json.loads(user.stdout)
    assert set(created) == {"user_id", "email", "totp_uri"}
    assert PASSWORD not in user.stdout + user.stderr
    secret = parse_qs(urlparse(created["totp_uri"]).query)["secret"][0]
    await log_in(client, "ops@example.com", PASSWORD, code(secret))

    made = admin(
        settings, "create-client", "--name", "etl", "--scopes", "tasks:read", "tasks:write", "--json"
    )
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert set(key) == {"client_id", "api_key"}
    me = await (await client.get("/api/auth/me", headers=bearer(key["api_key"]))).get_json()
    assert me["client_id"] == key["client_id"]
    assert me["scopes"] == ["tasks:read", "tasks:write"]


def test_bad_admin_input_is_refused_with_one_line(
    settings: Settings, clean_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process: each subprocess pays seconds of imports, and these paths need none of them
    with pytest.raises(SystemExit) as exit_info:
        _run(settings, lambda db: operators.create_operator(db, email="a@example.com", password="short"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("taskgate: The password must be 12 to 1024 characters long.")
    _run(settings, lambda db: operators.create_operator(db, email="a@example.com", password=PASSWORD))
    with pytest.raises(SystemExit):
        _run(settings, lambda db: operators.create_operator(db, email="A@example.com", password=PASSWORD))
    assert capsys.readouterr().err.strip() == "taskgate: An operator with this email already exists."
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["admin", "create-client", "--name", "x", "--scopes", "everything"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    # beyond the integer column: once a driver traceback instead of a line
    with pytest.raises(SystemExit) as exit_info:
        _run(
            settings,
            lambda db: clients.create_client(db, name="x", scopes=["tasks:read"], max_queued_tasks=2**31),
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "taskgate: max_queued_tasks must be 1 to 2147483647."


async def test_dev_credentials_are_issued_once_and_work(db: Database, client: Client, tmp_path: Path) -> None:
    credentials = await issue_dev_credentials(db, data_dir=tmp_path)
    assert credentials is not None
    await log_in(client, credentials.email, credentials.password, code(credentials.totp_secret))
    assert (await client.get("/api/auth/me", headers=bearer(credentials.api_key))).status_code == 200
    marker = (tmp_path / MARKER).read_text()
    assert credentials.password not in marker
    assert credentials.api_key not in marker
    assert await issue_dev_credentials(db, data_dir=tmp_path) is None
    # a fresh data directory over a database that has operators: nothing new is made
    assert await issue_dev_credentials(db, data_dir=tmp_path / "elsewhere") is None


async def test_dev_credentials_never_in_production(db: Database, tmp_path: Path) -> None:
    prod = Database(db.settings.model_copy(update={"APP_ENV": "prod"}))
    with pytest.raises(RuntimeError, match="never"):
        await issue_dev_credentials(prod, data_dir=tmp_path)


def test_make_run_prints_dev_credentials_on_first_start_only(
    settings: Settings, clean_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    print_dev_credentials(settings)  # the test profile: nothing
    assert capsys.readouterr().out == ""
    dev = settings.model_copy(update={"APP_ENV": "dev"})
    print_dev_credentials(dev)
    out = capsys.readouterr().out
    assert "operator password:" in out
    assert "API key:           tg_" in out
    print_dev_credentials(dev)
    assert capsys.readouterr().out == ""


def test_admin_says_in_one_line_what_is_wrong_with_a_number_or_the_database(
    settings: Settings, clean_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--rate-limit-per-s 0` once became the default 100 silently, `inf` no limit at all, and a
    database out of reach a traceback."""
    for flag, value in (
        ("--rate-limit-per-s", "0"),
        ("--rate-limit-per-s", "inf"),
        ("--max-queued-tasks", "0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser().parse_args(
                ["admin", "create-client", "--name", "x", "--scopes", "tasks:read", flag, value]
            )
        assert exit_info.value.code == 2
        assert "not a positive number" in capsys.readouterr().err
    unreachable = settings.model_copy(update={"DB_URI": "postgresql+asyncpg://taskgate@127.0.0.1:9/none"})
    with pytest.raises(SystemExit) as exit_info:
        _run(unreachable, lambda db: operators.create_operator(db, email="b@example.com", password=PASSWORD))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taskgate: "), err
    assert "\n" not in err, err
