"""Alembic, driven from code: the migrations ship inside the package (app/migrations)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(db_uri: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if db_uri:
        # ConfigParser interpolation would eat a literal % in a password
        config.set_main_option("sqlalchemy.url", db_uri.replace("%", "%%"))
    return config


@cache
def head_revisions() -> frozenset[str]:
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


@cache
def known_revisions() -> frozenset[str]:
    return frozenset(
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    )


def serves(revisions: frozenset[str] | None) -> bool:
    """Whether code of this release serves a database at `revisions`: its own heads, or a revision
    it does not know, which a later release's migration made (expand first, contract later keeps
    this release working on it while that release rolls out). Not an older schema, nor none."""
    if not revisions:
        return False
    return revisions == head_revisions() or not revisions & known_revisions()


def upgrade(db_uri: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (blocking: run it outside the event loop)."""
    command.upgrade(alembic_config(db_uri), revision)
