"""Which failures mean 'the database is out of reach' (503) and which are about the SQL (unchanged)."""

from __future__ import annotations

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import pytest
from sqlalchemy import exc as sa_exc

from app.database import StorageUnavailable, is_connection_failure


def wrapped(original: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """The shape SQLAlchemy's asyncpg dialect raises: its adapter error, caused by asyncpg's."""
    adapted = Exception(str(original))
    adapted.__cause__ = original
    return sa_exc.DBAPIError("SELECT 1", None, adapted, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset"),
        OSError("network unreachable"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.TooManyConnectionsError("too many clients"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("protocol lost its state"),
        StorageUnavailable("already mapped"),
        sa_exc.TimeoutError("QueuePool limit reached"),
        wrapped(asyncpg.CannotConnectNowError("starting up")),
        wrapped(ConnectionResetError(104, "reset")),
        wrapped(ValueError("anything"), invalidated=True),
    ],
)
def test_connection_level_failures_mean_unavailable(error: BaseException) -> None:
    assert is_connection_failure(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.CheckViolationError("violates check constraint"),
        asyncpg.DataError("invalid input syntax"),
        asyncpg.UndefinedTableError("relation does not exist"),
        asyncpg_base.DataError("invalid input for query argument $1"),  # the client's own argument check
        wrapped(asyncpg.UniqueViolationError("duplicate key")),
        ValueError("not a database error"),
    ],
)
def test_errors_about_the_statement_pass_through(error: BaseException) -> None:
    assert not is_connection_failure(error)
