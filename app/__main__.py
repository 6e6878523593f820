"""python -m app <command>: serve, worker, migrate, admin, dev-cert."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn
import uvloop

from app.settings import ALL_ROLES, ConfigurationError, Settings, configure_logging, load_settings

if TYPE_CHECKING:
    from app.runtime import Runtime

TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS"


def _fail(message: str) -> NoReturn:
    print(f"taskgate: {message}", file=sys.stderr)
    raise SystemExit(2)


def bootstrap(**overrides: Any) -> tuple[Settings, Any]:
    """Settings with a database: the embedded server when DB_URI is unset outside production.

    Returns the settings and the embedded server handle (None for an external database); the
    handle stops the server when the last process using it exits.
    """
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as exc:
        _fail(str(exc))
    configure_logging(settings)
    updates: dict[str, Any] = {}
    embedded = None
    if not settings.SECRET_KEYS:
        updates["SECRET_KEYS"] = [_dev_secret_key(settings.DATA_DIR)]
    if not settings.DB_URI:
        from app.src.database import embedded as embedded_db

        embedded, updates["DB_URI"] = embedded_db.start(settings.DATA_DIR)
    return settings.model_copy(update=updates), embedded


def _dev_secret_key(data_dir: Path) -> str:
    """A development key kept under DATA_DIR so sessions survive a restart (never in prod)."""
    from cryptography.fernet import Fernet

    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(Fernet.generate_key().decode())
    return path.read_text().strip()


def _certificate(settings: Settings) -> tuple[Path | None, Path | None]:
    if settings.TLS_TERMINATED_UPSTREAM:
        return None, None
    if settings.SSL_CERTFILE and settings.SSL_KEYFILE:
        return settings.SSL_CERTFILE, settings.SSL_KEYFILE
    from app.src.encryption.certs import ensure_dev_certificate

    return ensure_dev_certificate(settings.DATA_DIR / "tls")


def migrate(settings: Settings) -> None:
    """Apply the migrations; a failure is one line on standard error and exit 2, not a traceback
    (a migration that waited too long for a lock changed nothing and can simply be run again)."""
    import sqlalchemy.exc

    from app.src.database import migrations

    try:
        migrations.upgrade(settings.DB_URI or _fail("DB_URI is not set"))
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause = getattr(exc, "orig", None) or exc
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        _fail(f"migrations failed: {reason} (the failed migration changed nothing; run migrate again)")


def cmd_migrate(args: argparse.Namespace) -> None:
    settings, _embedded = bootstrap()
    from app.src.database import migrations

    migrate(settings)
    announce(settings, "migrations applied", schema=sorted(migrations.head_revisions()))


def uvicorn_config(
    asgi_app: Any, settings: Settings, *, certfile: Path | None, keyfile: Path | None
) -> uvicorn.Config:
    """How Taskgate serves: uvicorn on uvloop and httptools (with the limits of app/server.py),
    lifespan on, TLS 1.2+, no access log."""
    from app.server import guarded_protocol

    config = uvicorn.Config(
        asgi_app,
        host=settings.HOST,
        port=settings.PORT,
        lifespan="on",
        loop="uvloop",
        http=guarded_protocol(
            max_header_bytes=settings.SERVER_MAX_HEADER_BYTES,
            header_timeout_s=settings.SERVER_HEADER_TIMEOUT_S,
            body_timeout_s=settings.SERVER_BODY_TIMEOUT_S,
            max_connections=settings.SERVER_MAX_CONNECTIONS,
        ),
        # no route is a WebSocket: a handshake is answered as the plain request it also is (with
        # a WebSocket protocol loaded, uvicorn handed the app a websocket scope, where the error
        # handlers have no request to answer with: a 500 and a traceback for anyone who asked)
        ws="none",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        ssl_ciphers=TLS_CIPHERS,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=settings.TLS_TERMINATED_UPSTREAM,
        timeout_keep_alive=settings.SERVER_KEEP_ALIVE_S,
        # the drain's share of WORKER_SHUTDOWN_GRACE_S is set when the stop begins (app/server.py)
        timeout_graceful_shutdown=int(settings.WORKER_SHUTDOWN_GRACE_S),
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:  # a missing, unreadable or mismatched certificate or key
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"cannot load the certificate SSL_CERTFILE={certfile} with SSL_KEYFILE={keyfile}: {reason}")
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    return config


def serve_forever(config: uvicorn.Config, runtime: Runtime | None = None) -> None:
    """Serve until stopped; with a runtime, the first stop signal begins its shutdown at once and
    the whole stop fits in WORKER_SHUTDOWN_GRACE_S (see README, "Stopping")."""
    from app.server import Server

    if runtime is None:
        server = Server(config)
    else:
        server = Server(
            config,
            on_stop=runtime.begin_shutdown,
            on_force=runtime.end_grace,
            grace_s=runtime.settings.WORKER_SHUTDOWN_GRACE_S,
        )
    server.run()
    if not server.started:
        raise SystemExit(3)


def cmd_serve(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {}
    if args.roles:
        roles = [role.strip() for role in args.roles.split(",") if role.strip()]
        unknown = sorted(set(roles) - set(ALL_ROLES))
        if unknown:
            _fail(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROLES)}")
        overrides["ROLES"] = roles
    if args.port is not None:
        overrides["PORT"] = args.port
    settings, _embedded = bootstrap(**overrides)
    if args.migrate:
        migrate(settings)
        if settings.APP_ENV == "dev":
            from app.admin import print_dev_credentials

            print_dev_credentials(settings)
    from app import create_app

    certfile, keyfile = _certificate(settings)
    try:
        asgi_app = create_app(settings)
    except ConfigurationError as exc:
        _fail(str(exc))
    config = uvicorn_config(asgi_app, settings, certfile=certfile, keyfile=keyfile)
    scheme = "https" if certfile else "http"
    announce(settings, f"serving {scheme}://localhost:{settings.PORT}", roles=list(settings.ROLES))
    serve_forever(config, asgi_app.extensions["taskgate"])


def announce(settings: Settings, message: str, **fields: Any) -> None:
    """A line for the person who started the process: plain text on a console, and with
    LOG_FORMAT=json one JSON log line like every other (a log collector parses every line)."""
    if settings.LOG_FORMAT == "json":
        import structlog

        structlog.get_logger("taskgate").info(message, **fields)
        return
    extra = " ".join(f"{name}={','.join(v) if isinstance(v, list) else v}" for name, v in fields.items())
    print(f"taskgate: {message}" + (f" {extra}" if extra else ""), flush=True)


def cmd_worker(args: argparse.Namespace) -> None:
    # Trap stop signals before the slow part of start-up: a SIGTERM that arrives while imports and
    # connections are still being made must end in a clean exit 0, not a kill.
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop_requested.append(received))
    settings, _embedded = bootstrap(ROLES=["worker"])
    import structlog

    from app.database import StorageUnavailable
    from app.runtime import Runtime
    from app.src.api.kinds import load_kinds

    try:
        load_kinds(settings.TASK_KIND_MODULES)
    except ConfigurationError as exc:
        _fail(str(exc))

    async def main() -> None:
        runtime = Runtime(settings)
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                # a second stop signal, as a second Ctrl-C to serve: the grace is over; running
                # tasks are handed back, the last completions written, and the process exits
                runtime.end_grace()
                return
            # stop claiming at once; stop() below then finishes within what is left of the grace
            runtime.begin_shutdown()
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        if stop_requested:
            return
        try:
            await runtime.start()
        except StorageUnavailable as exc:
            # as serve's start-up fails: one log line (JSON in the JSON profile), exit 3
            structlog.get_logger("taskgate").error("runtime failed to start", error=str(exc))
            await runtime.stop()
            raise SystemExit(3) from None
        try:
            await stop.wait()
        finally:
            await runtime.stop()

    uvloop.run(main())


def cmd_dev_cert(args: argparse.Namespace) -> None:
    from app.src.encryption.certs import ensure_dev_certificate

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        _fail(str(exc))
    cert, key = ensure_dev_certificate(Path(args.dir) if args.dir else settings.DATA_DIR / "tls")
    print(f"certificate: {cert}\nkey: {key}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m app",
        description="Taskgate: durable background work on PostgreSQL, served over HTTPS.",
    )
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the HTTPS API (and workers and scheduler, per --roles)",
        description="Serve HTTPS with uvicorn. Without DB_URI (dev) an embedded PostgreSQL starts "
        "under DATA_DIR; without SSL_CERTFILE (dev) a self-signed certificate is made there.",
    )
    serve.add_argument(
        "--roles",
        help=f"comma-separated roles this process runs: {','.join(ALL_ROLES)} (default: ROLES)",
    )
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT, 8080)")
    serve.add_argument(
        "--migrate", action="store_true", help="apply migrations before serving (make run does)"
    )
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser(
        "worker",
        help="run a worker process without HTTP",
        description="Claim and run tasks until SIGTERM: stop claiming, let running tasks finish "
        "within WORKER_SHUTDOWN_GRACE_S, release the rest, exit 0. A second SIGTERM or SIGINT "
        "ends the grace at once.",
    )
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser(
        "migrate",
        help="apply database migrations up to head",
        description="Apply the Alembic migrations shipped in the package (safe to run from "
        "several replicas at once: an advisory lock serialises them).",
    )
    migrate.set_defaults(func=cmd_migrate)

    from app import admin

    admin.register(sub, bootstrap)

    dev_cert = sub.add_parser(
        "dev-cert",
        help="create a self-signed development certificate",
        description="Write cert.pem and key.pem (self-signed, localhost) unless they exist. "
        "For development only: production takes SSL_CERTFILE and SSL_KEYFILE.",
    )
    dev_cert.add_argument("--dir", help="directory for the files (default: DATA_DIR/tls)")
    dev_cert.set_defaults(func=cmd_dev_cert)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
