"""The one exception family of Taskgate; the transport turns it into RFC 9457 problem+json."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class AppError(Exception):
    """An error a client can act on. `type` is a URI naming the problem, `detail` is for humans."""

    status: int = 500
    type: str = "about:blank"
    title: str | None = None

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        type: str | None = None,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title or "")
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if title is not None:
            self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title or HTTPStatus(self.status).phrase,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def problem_type(slug: str) -> str:
    return f"urn:taskgate:problem:{slug}"


class BadRequest(AppError):
    status = 400


class Unauthorized(AppError):
    status = 401
    type = problem_type("unauthorized")
    title = "Authentication required"


class Forbidden(AppError):
    status = 403
    type = problem_type("forbidden")
    title = "Missing scope"


class NotFound(AppError):
    status = 404
    type = problem_type("not-found")
    title = "Not found"


class Conflict(AppError):
    status = 409
    type = problem_type("conflict")
    title = "Conflict"


class TooManyQueues(Conflict):
    """A client at its cap on queues (CLIENT_MAX_QUEUES) named a queue it does not have."""

    type = problem_type("too-many-queues")
    title = "Too many queues"


class Unprocessable(AppError):
    status = 422
    type = problem_type("validation")
    title = "Invalid request"


class TooManyRequests(AppError):
    status = 429
    type = problem_type("rate-limited")
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class ServiceUnavailable(AppError):
    status = 503
    type = problem_type("unavailable")
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


def field_errors(pydantic_errors: list[Any], *, prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic's error list as [{field, message, type}] with dotted field paths."""
    out = []
    for err in pydantic_errors:
        loc = (*prefix, *err.get("loc", ()))
        out.append(
            {
                "field": ".".join(str(part) for part in loc) or None,
                "message": err.get("msg", "invalid"),
                "type": err.get("type", "value_error"),
            }
        )
    return out
