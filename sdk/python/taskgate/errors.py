"""Errors: `ApiError` carries the server's RFC 9457 problem+json answer."""

from __future__ import annotations

from typing import Any


class TaskgateError(Exception):
    """Base class of every error this SDK raises."""


class ApiError(TaskgateError):
    """An error answer of the API: `status`, `type`, `title`, `detail`, and field `errors`."""

    def __init__(
        self,
        status: int,
        *,
        type: str = "about:blank",
        title: str | None = None,
        detail: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.request_id = request_id
        self.body = body
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status} {self.title or ''}".strip()
        if self.detail:
            text += f": {self.detail}"
        for error in self.errors[:5]:
            text += f"\n  {error.get('field')}: {error.get('message')}"
        return text


class TimeoutExceeded(TaskgateError):
    """`wait` returned before the task was terminal."""


class RetryLater(Exception):
    """Raised by a handler: fail this attempt, retry no sooner than `after_s`."""

    def __init__(self, reason: str = "retry later", *, after_s: float | None = None) -> None:
        super().__init__(reason)
        self.after_s = after_s


class PermanentError(Exception):
    """Raised by a handler: fail the task for good (dead letter), no further attempts."""


class TaskCancelled(Exception):
    """Raised by a handler that saw `ctx.cancelled` and stopped: the task ends cancelled."""


class SignalTimeout(Exception):
    """`ctx.wait_signal(name, timeout_s=...)` passed its deadline without the signal."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no signal {name!r} arrived before the timeout")
        self.name = name


class ChildFailed(Exception):
    """A gathered child ended discarded or cancelled (the parent may catch it)."""

    def __init__(self, key: str, task_id: str, status: str, error: str | None = None) -> None:
        super().__init__(f"child {key!r} ({task_id}) was {status}" + (f": {error}" if error else ""))
        self.key = key
        self.task_id = task_id
        self.status = status
        self.error = error
