"""python -m app admin ...: operators and API clients from the shell, and the dev credentials of `make run`.

Results go to standard output (with --json: exactly one JSON object); logs go to standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from app.settings import Settings
from app.src.api.models.auth import SCOPES

T = TypeVar("T")
Bootstrap = Callable[..., tuple[Settings, Any]]


class AdminError(Exception):
    """A one-line reason the command could not do its job."""


def _fail(message: str) -> NoReturn:
    print(f"taskgate: {message}", file=sys.stderr)
    raise SystemExit(2)


def _run(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    import asyncpg

    from app.database import Database, StorageUnavailable
    from app.src.api.errors import AppError
    from app.src.database.migrations import head_revisions

    async def main() -> T:
        db = Database(settings)
        await db.connect()
        try:
            if not await db.schema_at_head(head_revisions()):
                raise AdminError("the database schema is not at head; run `python -m app migrate` first")
            return await work(db)
        finally:
            await db.disconnect()

    try:
        return asyncio.run(main())
    except AdminError as exc:
        _fail(str(exc))
    except AppError as exc:
        _fail(exc.detail or exc.problem()["title"])
    except StorageUnavailable as exc:
        _fail(f"{exc}; is DB_URI right and PostgreSQL up?")
    except asyncpg.PostgresError as exc:
        _fail(f"PostgreSQL refused it: {exc}")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a finite number above zero (argparse reports anything else in one line)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def read_password(prompt: str = "Password: ") -> str:
    """Ask twice on a terminal; otherwise read one line from standard input (for scripts)."""
    if sys.stdin.isatty():
        password = getpass.getpass(prompt)
        if getpass.getpass("Repeat it: ") != password:
            _fail("the passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        _fail("no password given")
    return password


def cmd_create_user(args: argparse.Namespace, bootstrap: Bootstrap) -> None:
    password = read_password()
    settings, _embedded = bootstrap()
    from app.src.api.auth import operators

    operator = _run(settings, lambda db: operators.create_operator(db, email=args.email, password=password))
    if args.json:
        print(
            json.dumps(
                {"user_id": str(operator.user_id), "email": operator.email, "totp_uri": operator.totp_uri}
            )
        )
        return
    print(f"user_id:  {operator.user_id}\nemail:    {operator.email}")
    print(f"totp_uri: {operator.totp_uri}")
    print("Add the URI to an authenticator app (or type the secret in it): TOTP is required to log in.")


def cmd_create_client(args: argparse.Namespace, bootstrap: Bootstrap) -> None:
    settings, _embedded = bootstrap()
    from app.src.api.auth import clients

    _, key = _run(
        settings,
        lambda db: clients.create_client(
            db,
            name=args.name,
            scopes=args.scopes,
            max_queued_tasks=args.max_queued_tasks,
            rate_limit_per_s=args.rate_limit_per_s,
        ),
    )
    if args.json:
        print(json.dumps({"client_id": str(key.client_id), "api_key": key.api_key}))
        return
    print(f"client_id: {key.client_id}\napi_key:   {key.api_key}")
    print("The API key is shown once; only its hash is stored.")


def cmd_reencrypt(args: argparse.Namespace, bootstrap: Bootstrap) -> None:
    settings, _embedded = bootstrap()
    from app.src.api.auth.rotation import reencrypt_secrets

    result = _run(settings, reencrypt_secrets)
    if args.json:
        print(json.dumps({"reencrypted": result.rotated, "unreadable": result.unreadable}))
    else:
        print(f"re-encrypted {result.rotated} secret(s) under the first SECRET_KEYS entry")
    if result.unreadable:
        _fail(f"{result.unreadable} secret(s) were made with a key no longer configured; keep the old keys")
    if not args.json:
        print("older keys can now be removed from SECRET_KEYS")


def register(sub: Any, bootstrap: Bootstrap) -> None:
    """Add `admin` and its subcommands to the CLI (`sub`: the root parser's subparsers)."""
    admin = sub.add_parser(
        "admin",
        help="create operators and API clients, re-encrypt secrets",
        description="Administration from the shell. With --json each command prints one JSON object.",
    )
    commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")

    user = commands.add_parser(
        "create-user",
        help="create an operator (TOTP on from the start)",
        description="Create an operator. The password is asked for on a terminal, or read from "
        "standard input when that is not a terminal. Prints the TOTP enrolment URI once. "
        "--json: {user_id, email, totp_uri}.",
    )
    user.add_argument("--email", required=True)
    user.add_argument("--json", action="store_true", help="print one JSON object")
    user.set_defaults(func=lambda args: cmd_create_user(args, bootstrap))

    client = commands.add_parser(
        "create-client",
        help="create an API client and print its API key once",
        description="Create an API client with the given scopes and print its first API key "
        "(shown once). --json: {client_id, api_key}.",
    )
    client.add_argument("--name", required=True)
    client.add_argument("--scopes", nargs="+", required=True, choices=SCOPES, metavar="SCOPE")
    client.add_argument("--max-queued-tasks", type=_positive(int), help="unfinished tasks it may hold")
    client.add_argument("--rate-limit-per-s", type=_positive(float), help="requests per second (default 100)")
    client.add_argument("--json", action="store_true", help="print one JSON object")
    client.set_defaults(func=lambda args: cmd_create_client(args, bootstrap))

    reencrypt = commands.add_parser(
        "reencrypt-secrets",
        help="re-encrypt stored secrets under the first SECRET_KEYS entry",
        description="Finish a key rotation: after prepending a new key to SECRET_KEYS, re-encrypt "
        "every TOTP and signing secret under it; then the old key can be removed.",
    )
    reencrypt.add_argument("--json", action="store_true", help="print one JSON object")
    reencrypt.set_defaults(func=lambda args: cmd_reencrypt(args, bootstrap))


def print_dev_credentials(settings: Settings) -> None:
    """`make run`, dev profile: on the first start of an empty database, show how to get in."""
    if settings.APP_ENV != "dev":
        return
    from app.src.api.auth.dev import issue_dev_credentials

    credentials = _run(settings, lambda db: issue_dev_credentials(db, data_dir=settings.DATA_DIR))
    if credentials is None:
        return
    print(
        "\n".join(
            [
                "taskgate: development credentials (shown once, dev profile only)",
                f"  operator email:    {credentials.email}",
                f"  operator password: {credentials.password}",
                f"  TOTP secret:       {credentials.totp_secret}",
                f"  TOTP URI:          {credentials.totp_uri}",
                f"  API client id:     {credentials.client_id}",
                f"  API key:           {credentials.api_key}",
                "  try: curl -k -H 'Authorization: Bearer <API key>' https://localhost:"
                f"{settings.PORT}/api/auth/me",
            ]
        ),
        flush=True,
    )
