"""Shared fixtures: one real PostgreSQL per session, a clean database per test.

The embedded server (a pip-installed wheel, under var/test/) runs unless TEST_DB_URI names another
server. Isolation is by TRUNCATE between tests, so worker subprocesses and the real HTTPS server
see the same committed data a test wrote. Run in parallel (`pytest -n 2`, as `make test` does),
every pytest-xdist worker has a database of its own on the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from cryptography.fernet import Fernet
from quart import Quart
from quart.typing import TestClientProtocol as Client

from app import create_app
from app.database import Database
from app.settings import Settings, load_settings
from app.src.api.engine.task_engine import SubmitRules, TaskEngine
from app.src.api.kinds import load_kinds
from app.src.api.models.auth import IssuedKey, NewOperator
from app.src.database import migrations
from app.src.database.embedded import create_database

ROOT = Path(__file__).resolve().parents[1]
TEST_DATABASE = "taskgate_test"
# the test server trades durability for speed: nothing here must survive a crash
TEST_TUNING = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def driver_uri(sqlalchemy_uri: str) -> str:
    return sqlalchemy_uri.replace("postgresql+asyncpg://", "postgresql://", 1)


def _database_of(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def _own_database(uri: str, name: str) -> str:
    """`uri` with its database replaced by `name`, this xdist worker's own when run in parallel."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return urlunsplit(urlsplit(uri)._replace(path=f"/{name}_{worker}" if worker else f"/{name}"))


@pytest.fixture(scope="session")
def database_uri() -> Iterator[str]:
    """A migrated database, as a postgresql+asyncpg URI."""
    external = os.environ.get("TEST_DB_URI")
    if external:
        admin_uri = external.replace("postgresql://", "postgresql+asyncpg://", 1)
        uri = admin_uri
        if os.environ.get("PYTEST_XDIST_WORKER"):
            uri = _own_database(admin_uri, _database_of(admin_uri) or TEST_DATABASE)
            asyncio.run(create_database(driver_uri(admin_uri), _database_of(uri)))
        migrations.upgrade(uri)
        yield uri
        return
    from app.src.database import embedded

    data_dir = Path(os.environ.get("TEST_DATA_DIR", ROOT / "var" / "test"))
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "start.lock").open("w") as lock:  # parallel workers start (or join) it in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        _server, admin_uri = embedded.start(data_dir, tuning=TEST_TUNING)
        uri = _own_database(admin_uri, TEST_DATABASE)
        asyncio.run(create_database(driver_uri(admin_uri), _database_of(uri)))
    migrations.upgrade(uri)
    yield uri


@pytest.fixture(scope="session")
def secret_keys() -> list[str]:
    return [Fernet.generate_key().decode()]


TEST_SETTINGS: dict[str, Any] = {
    "APP_ENV": "test",
    "LOG_FORMAT": "console",
    "LEASE_SECONDS": 5,
    "TASK_KIND_MODULES": ["tests.kinds"],
    "WORKER_POLL_INTERVAL_S": 0.2,
    "RESCUE_INTERVAL_S": 0.5,
}


@pytest.fixture
def settings(database_uri: str, secret_keys: list[str], tmp_path: Path) -> Settings:
    return load_settings(
        **TEST_SETTINGS, DB_URI=database_uri, SECRET_KEYS=secret_keys, DATA_DIR=tmp_path, ROLES=["api"]
    )


async def truncate_all(uri: str) -> None:
    conn = await asyncpg.connect(driver_uri(uri))
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(tablename) AS t FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        if tables:
            await conn.execute(f"TRUNCATE {', '.join(r['t'] for r in tables)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def clean_database(database_uri: str) -> str:
    await truncate_all(database_uri)
    return database_uri


@pytest.fixture
async def db(settings: Settings, clean_database: str) -> AsyncIterator[Database]:
    database = Database(settings)
    await database.connect()
    try:
        yield database
    finally:
        await database.disconnect()


def engine_over(database: Database) -> TaskEngine:
    """A task engine over `database` with the rules its settings give (as the runtime builds one)."""
    return TaskEngine(database, SubmitRules.from_settings(database.settings, kinds=load_kinds()))


@pytest.fixture
async def engine(db: Database) -> AsyncIterator[TaskEngine]:
    """The task engine over the test database: caches, insert coalescer and enqueue rules."""
    task_engine = engine_over(db)
    try:
        yield task_engine
    finally:
        await task_engine.close()


@pytest.fixture
async def app(settings: Settings, clean_database: str) -> AsyncIterator[Quart]:
    application = create_app(settings)
    async with application.test_app():
        yield application


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


@pytest.fixture
async def serving(settings: Settings, clean_database: str) -> AsyncIterator[Any]:
    """serving(**overrides): an app served in this loop with the given settings (e.g. roles)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Quart:
            application = create_app(settings.model_copy(update=overrides))
            await stack.enter_async_context(application.test_app())
            return application

        yield start


def subprocess_env(**extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SECRET_", "APP_"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Clients made for tests get a rate limit no test reaches by accident.
TEST_CLIENT_RATE_LIMIT_PER_S = 100_000.0


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_client(db: Database, name: str, scopes: tuple[str, ...] | None = None) -> IssuedKey:
    """A real API client (every scope unless told) with one key, made through the auth service."""
    from app.src.api.auth import clients
    from app.src.api.models.auth import SCOPES

    _, key = await clients.create_client(
        db, name=name, scopes=scopes or SCOPES, rate_limit_per_s=TEST_CLIENT_RATE_LIMIT_PER_S
    )
    return key


@pytest.fixture
async def api_client(db: Database) -> IssuedKey:
    """The API client tests act as: every scope; `.client_id` is the tenant, `.api_key` its key."""
    return await make_client(db, "tests")


@pytest.fixture
def auth_headers(api_client: IssuedKey) -> dict[str, str]:
    """Headers of an API client holding every scope, in the tenant tests act as."""
    return bearer(api_client.api_key)


@pytest.fixture
async def other_client(db: Database) -> IssuedKey:
    """A second tenant with every scope: it must never see the first one's objects."""
    return await make_client(db, "other tenant")


@pytest.fixture
def other_client_headers(other_client: IssuedKey) -> dict[str, str]:
    return bearer(other_client.api_key)


OPERATOR_PASSWORD = "operator password for tests"


@pytest.fixture
async def operator(db: Database) -> NewOperator:
    """An operator (password OPERATOR_PASSWORD, TOTP secret in `.totp_secret`)."""
    from app.src.api.auth import operators

    return await operators.create_operator(db, email="operator@example.com", password=OPERATOR_PASSWORD)


@pytest.fixture
async def operator_headers(db: Database, operator: NewOperator) -> dict[str, str]:
    """A live operator session (both factors taken as proven: the login flow has its own tests)."""
    from app.src.api.auth import operators

    session = await operators.start_session(db, user_id=operator.user_id)
    return bearer(session.access_token)
