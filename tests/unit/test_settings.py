"""Settings: typed parsing of the environment and production's refusal to start half-configured."""

import pytest

from app.settings import ConfigurationError, load_settings

KEY = "SfkNBxE3pbOLVVqDc4Z5iwTY26wP6J2vn46qXL6ogQc="  # what Fernet.generate_key() makes
# the Kubernetes example's Secret, as it ships
PLACEHOLDER = (
    "CHANGE-ME (python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
)


def test_comma_separated_variables_become_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_KEYS", "k1, k2")
    monkeypatch.setenv("ROLES", "api,worker")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("HTTP_ALLOWED_NETWORKS", "10.0.0.0/8,::1/128")
    settings = load_settings(APP_ENV="test")
    assert settings.SECRET_KEYS == ["k1", "k2"]
    assert settings.ROLES == ["api", "worker"]
    assert settings.CORS_ORIGINS == ["https://a.example", "https://b.example"]
    assert [str(n) for n in settings.HTTP_ALLOWED_NETWORKS] == ["10.0.0.0/8", "::1/128"]


def test_unknown_role_is_a_one_line_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLES", "api,janitor")
    with pytest.raises(ConfigurationError, match="ROLES"):
        load_settings(APP_ENV="test")


def test_dev_profile_defaults_to_console_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert load_settings(APP_ENV="dev").LOG_FORMAT == "console"


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, ["DB_URI", "SECRET_KEYS", "SSL_CERTFILE"]),
        ({"DB_URI": "postgresql+asyncpg://db/x"}, ["SECRET_KEYS", "SSL_CERTFILE"]),
        ({"DB_URI": "postgresql+asyncpg://db/x", "SECRET_KEYS": KEY}, ["SSL_CERTFILE"]),
        # a placeholder left in place, or a word, is no key: it once encrypted everything
        ({"DB_URI": "postgresql+asyncpg://db/x", "SECRET_KEYS": PLACEHOLDER}, ["SECRET_KEYS as Fernet"]),
        ({"DB_URI": "postgresql+asyncpg://db/x", "SECRET_KEYS": f"{KEY},secret"}, ["SECRET_KEYS as Fernet"]),
    ],
)
def test_production_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], missing: list[str]
) -> None:
    for name in ("DB_URI", "SECRET_KEYS", "SSL_CERTFILE", "SSL_KEYFILE", "TLS_TERMINATED_UPSTREAM"):
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(APP_ENV="prod")
    for name in missing:
        assert name in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "CHANGE-ME" not in str(caught.value)  # a secret's value is never repeated


def test_production_starts_behind_a_tls_terminating_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_URI", "postgresql+asyncpg://db/x")
    monkeypatch.setenv("SECRET_KEYS", KEY)
    monkeypatch.setenv("TLS_TERMINATED_UPSTREAM", "true")
    settings = load_settings(APP_ENV="prod")
    assert settings.LOG_FORMAT == "json"
    assert not settings.tls_enabled


@pytest.mark.parametrize("value", ["inf", "nan", "1e9"])
def test_a_retention_postgresql_cannot_hold_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Accepted, it failed the prune job at every run (and with it every other prune)."""
    monkeypatch.setenv("TASK_RETENTION_DAYS", value)
    with pytest.raises(ConfigurationError, match="TASK_RETENTION_DAYS"):
        load_settings(APP_ENV="test")


def test_a_database_uri_is_taken_in_its_libpq_forms_and_refused_in_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`postgresql://...` (what psql and every hosting provider print) once failed at start with
    "connect() got an unexpected keyword argument 'dbname'" under a traceback."""
    for given in (
        "postgresql://u:p@db:5432/x",
        "postgres://u:p@db:5432/x",
        "postgresql+asyncpg://u:p@db:5432/x",
    ):
        monkeypatch.setenv("DB_URI", given)
        monkeypatch.setenv("DB_LISTEN_URI", given)
        settings = load_settings(APP_ENV="test")
        assert settings.DB_URI == settings.DB_LISTEN_URI == "postgresql+asyncpg://u:p@db:5432/x"
    monkeypatch.delenv("DB_LISTEN_URI")
    monkeypatch.setenv("DB_URI", "mysql://u:hunter2@db/x")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(APP_ENV="test")
    assert str(caught.value).startswith("invalid setting DB_URI: ")
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("DB_URI", "")
    assert load_settings(APP_ENV="test").DB_URI is None  # unset: the embedded database in dev
