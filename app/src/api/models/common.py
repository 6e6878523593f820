"""Shapes of the common endpoints and of problem details."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ListQuery(BaseModel):
    """The query string of every list endpoint (GET /api/tasks first had it): a parameter it does
    not take is a 422 naming it. Ignored, a typo'd filter (`?queu=reports`) listed everything as if
    it matched."""

    model_config = ConfigDict(extra="forbid")


class PageQuery(ListQuery):
    """Keyset pages: `limit` items at most, then `next_cursor` names where the next page starts."""

    limit: int = Field(default=100, ge=1, le=500, description="items per page")
    cursor: str | None = Field(
        default=None, max_length=1024, description="the `next_cursor` of the previous page"
    )


def _absent(cursor: str | None) -> bool:
    return cursor is None


def added_next_cursor() -> Any:
    """`next_cursor` of a list that had no pages before: absent on the last page. A client that
    read the list as {items: [...]} and nothing else (the SDK before pages: `dict[str, list[...]]`)
    still reads a list of one page; a longer one it can no longer take for whole."""
    return Field(
        default=None,
        exclude_if=_absent,
        description="the next page's `cursor`; absent on the last page",
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class Version(BaseModel):
    name: str
    version: str
    schema_heads: list[str]
