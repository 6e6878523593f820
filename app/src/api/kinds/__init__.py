"""Task kinds: each declared once with @task_kind, enqueued by the API, executed by workers.

A declaration is import-layer code: it records the kind and starts nothing. The API uses the
payload model to validate on enqueue; the worker validates again before it runs the handler, so
a payload that no longer fits its contract discards the task instead of crashing the worker.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel

from app.src.api.engine.durable import (
    ChildSpec,
    CompositionError,
    Suspended,
    Suspension,
    Wait,
    check_step_result,
    step_named_like_a_wait,
    wait_named_like_another,
)
from app.src.api.engine.submit import submit_in_transaction
from app.src.api.engine.task_engine import SubmitRules, TaskEngine
from app.src.api.state_machine import TERMINAL
from app.src.database.durable import DurableState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from app.src.api.models.tasks import Task

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


class RetryLater(Exception):
    """Fail this attempt and retry no sooner than `after_s` (e.g. an HTTP Retry-After)."""

    def __init__(self, reason: str, *, after_s: float | None = None, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.after_s = after_s
        self.http_status = http_status


class PermanentError(Exception):
    """Fail this task for good: no further attempts (dead letter)."""

    def __init__(self, reason: str, *, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.http_status = http_status


class Deferred(Exception):
    """This attempt could not start (a shared resource is busy): run the task again after
    `after_s` without counting an attempt and without recording one."""

    def __init__(self, reason: str, *, after_s: float) -> None:
        super().__init__(reason)
        self.after_s = after_s


class TaskCancelled(Exception):
    """Raised by a handler that observed a cancellation request and stopped."""


class WaitExternal(Exception):
    """The handler handed the work to an external provider; the task waits while it is polled."""

    def __init__(self, state: dict[str, Any], *, poll_after_s: float, http_status: int | None = None) -> None:
        super().__init__("waiting for an external provider")
        self.state = state
        self.poll_after_s = poll_after_s
        self.http_status = http_status


class SignalTimeout(Exception):
    """`ctx.wait_signal(name, timeout_s=...)` passed its deadline without the signal."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no signal {name!r} arrived before the timeout")
        self.name = name


class ChildFailed(Exception):
    """A gathered child ended discarded or cancelled (the parent may catch it)."""

    def __init__(self, key: str, task_id: UUID, status: str, error: str | None) -> None:
        super().__init__(f"child {key!r} ({task_id}) was {status}" + (f": {error}" if error else ""))
        self.key = key
        self.task_id = task_id
        self.status = status
        self.error = error


class LeaseLost(BaseException):
    """The attempt no longer holds its task (its lease was rescued): the handler must stop."""


@dataclass(frozen=True, slots=True)
class Child:
    """A spawned child: its key, and its id once it exists (after the suspension that made it)."""

    key: str
    id: UUID | None = None


ProgressSink = Callable[[UUID, int, dict[str, Any]], Awaitable[None]]
StepSink = Callable[["TaskContext", str, Any], Awaitable[None]]  # stores a step, or raises


class TaskContext:
    """What a running handler knows about its task, and how it reports back."""

    __slots__ = (
        "_cancelled",
        "_checkpoint",
        "_progress",
        "_spawn_keys",
        "_spawns",
        "_state",
        "attempt",
        "client_id",
        "http_status",
        "kind",
        "max_attempts",
        "queue",
        "resources",
        "task_id",
        "traceparent",
    )

    def __init__(
        self,
        *,
        task_id: UUID,
        attempt: int,
        max_attempts: int,
        queue: str,
        kind: str,
        client_id: UUID,
        progress: ProgressSink | None = None,
        resources: Mapping[str, Any] | None = None,
        state: DurableState | None = None,
        checkpoint: StepSink | None = None,
    ) -> None:
        self.task_id = task_id
        # the W3C trace context the task was enqueued in, when kept (outbound requests carry it)
        self.traceparent: str | None = None
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.queue = queue
        self.kind = kind
        self.client_id = client_id
        self._cancelled: asyncio.Event | None = None
        self._progress = progress
        # Process-wide components the runtime started for handlers (e.g. "http": OutboundHttp);
        # handed over explicitly so no kind needs a module-level client.
        self.resources: Mapping[str, Any] = resources or {}
        # A handler that called a provider sets the HTTP status it got: the attempt records it.
        self.http_status: int | None = None
        # durable composition: what earlier runs stored, where new steps go, children to create
        self._state = state if state is not None else DurableState()  # its own: steps are added
        self._checkpoint = checkpoint
        self._spawns: list[ChildSpec] = []
        self._spawn_keys: set[str] = set()

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when a client asks to cancel the running task (made on first use: most never look)."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    async def report_progress(self, progress: dict[str, Any]) -> None:
        """Store progress on the task and publish it to /api/tasks/{id}/events."""
        if self._progress is not None:
            await self._progress(self.task_id, self.attempt, progress)

    # --- durable composition (SPEC: "Durable composition") --------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` at most once per task to success; later runs get its stored JSON result.

        A step that raises is retried with the task (the queue's policy); one that succeeded is
        stored before this returns, so it never runs again, even if the worker dies right after.
        """
        steps = self._state.steps
        if name in self._state.waits:  # its record is not this step's result
            raise PermanentError(step_named_like_a_wait(name))
        if name in steps:
            return steps[name]
        spawned = len(self._spawns)
        value = fn(*args)
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        try:
            check_step_result(name, value)
        except CompositionError as exc:
            raise PermanentError(str(exc)) from None
        if len(self._spawns) > spawned:
            # children spawned inside the step are stored with it, in one suspension (the task
            # resumes at once): stored alone, the step replays from storage without its spawns,
            # so children not yet recorded when the attempt ended were never created
            raise Suspended(Suspension(steps={name: value}, spawn=self.take_spawns()))
        if self._checkpoint is None:
            raise RuntimeError("ctx.step needs a worker to store its result")
        await self._checkpoint(self, name, value)
        steps[name] = value
        return value

    async def sleep(self, name: str, seconds: float) -> None:
        """Durable sleep: the attempt ends, the task is `scheduled` until then, no worker slot is
        held, and the handler resumes past this point."""
        stored = self._own_wait("sleep", name)
        if isinstance(stored, dict) and stored.get("done"):
            return
        raise Suspended(Suspension(spawn=self.take_spawns(), wait=Wait("sleep", name, float(seconds))))

    async def wait_signal(self, name: str, *, timeout_s: float | None = None) -> Any:
        """The data of signal `name` (POST /api/tasks/{id}/signals/{name}); the task is `waiting`
        until it arrives. A signal sent before the wait is kept and delivered here. Raises
        SignalTimeout once `timeout_s` passed without it."""
        stored = self._own_wait("signal wait", name)
        signals = self._state.signals
        if name in signals:
            return signals[name]
        if isinstance(stored, dict) and stored.get("timed_out"):
            raise SignalTimeout(name)
        raise Suspended(Suspension(spawn=self.take_spawns(), wait=Wait("signal", name, timeout_s)))

    def _own_wait(self, what: str, name: str) -> Any:
        """The wait's stored record, if it has one. Under the name of a step (stored in an earlier
        run or this one) the stored value is the step's result, not this wait's record: one that
        holds `done` or `timed_out` would end the wait at once, in silence, so the task fails for
        good here, as the server fails any other (and as an SDK worker does)."""
        stored = self._state.steps.get(name)
        if name in self._state.steps and name not in self._state.waits:
            raise PermanentError(wait_named_like_another(what, name))
        return stored

    async def spawn(
        self,
        kind: str | TaskKind[Any, Any],
        payload: BaseModel | dict[str, Any],
        *,
        key: str,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
    ) -> Child:
        """A child task, created once per (this task, key): when this attempt next suspends or
        ends, through the same rules as any enqueue. A later run gets the same child back."""
        known = self._state.children.get(key)
        if known is not None:
            return Child(key, UUID(str(known["id"])))
        if key in self._spawn_keys:
            raise ValueError(f"a child with key {key!r} was spawned twice")
        self._spawn_keys.add(key)
        self._spawns.append(
            ChildSpec(
                key=key,
                kind=kind if isinstance(kind, str) else kind.name,
                payload=payload.model_dump(mode="json") if isinstance(payload, BaseModel) else dict(payload),
                queue=queue or self.queue,
                priority=priority,
                max_attempts=max_attempts,
            )
        )
        return Child(key)

    async def gather(self, children: Sequence[Child]) -> list[Any]:
        """The children's results, in order, once every child of this task is terminal (the task
        is `waiting` until then). A discarded or cancelled child raises ChildFailed."""
        known = self._state.children
        for child in children:
            # a handle that is not this task's child (made by hand, or another task's) would have
            # the task wait for a child that never counts, and resume at once, over and over
            stored = known.get(child.key)
            if stored is None and child.key not in self._spawn_keys:
                raise PermanentError(f"ctx.gather: {child.key!r} is not a child this task spawned")
            if stored is not None and child.id is not None and str(child.id) != str(stored["id"]):
                raise PermanentError(f"ctx.gather: task {child.id} is not this task's child {child.key!r}")
        if any(c.key not in known or known[c.key]["status"] not in TERMINAL for c in children):
            raise Suspended(Suspension(spawn=self.take_spawns(), wait=Wait("children")))
        results = []
        for child in children:
            state = known[child.key]
            if state["status"] != "completed":
                raise ChildFailed(child.key, UUID(str(state["id"])), state["status"], state.get("error"))
            results.append(state.get("result"))
        return results

    def take_spawns(self) -> list[ChildSpec]:
        """Children spawned in this run that no suspension recorded yet; they are recorded now."""
        spawns, self._spawns = self._spawns, []
        return spawns


Handler = Callable[[TaskContext, Any], Awaitable[Any]]


@dataclass(frozen=True)
class TaskKind(Generic[P, R]):
    name: str
    payload: type[P]
    result: type[R] | None
    handler: Handler
    location: str
    max_attempts: int | None = None
    aliases: tuple[str, ...] = ()
    description: str | None = None
    timeout_s: float | None = None

    def validate_payload(self, payload: Any, *, context: Mapping[str, Any] | None = None) -> P:
        """Validate against the contract; `context` carries deployment settings a model may need
        (e.g. the networks the `http` kind may reach), the same at enqueue and at run time."""
        return self.payload.model_validate(payload, context=dict(context) if context else None)

    async def enqueue(
        self,
        payload: P,
        *,
        db: AsyncConnection,
        client_id: UUID,
        engine: TaskEngine | None = None,
        queue: str = "default",
        priority: int = 5,
        delay_s: float | None = None,
        concurrency_key: str | None = None,
    ) -> Task:
        """Enqueue inside the caller's open transaction: the task commits with the caller's data.

        `client_id` names the API client the task belongs to: it is then that client's task, seen,
        listed, followed and cancelled through the API with that client's keys (an unknown id
        raises UnknownClient). A handler enqueueing follow-up work passes `ctx.client_id`.

        The rules of every enqueue apply (contract, NUL check, quota, defaults). Pass the runtime's
        `engine` (handlers find it as `ctx.resources["engine"]`) for the deployment's rules; without
        it the built-in defaults apply (the default quota, no extra allowed networks).
        """
        return await submit_in_transaction(
            db,
            rules=engine.rules if engine is not None else _BUILTIN_RULES,
            kind=self,
            payload=payload.model_dump(mode="json"),
            client_id=client_id,
            queue=queue,
            priority=priority,
            delay_s=delay_s,
            concurrency_key=concurrency_key,
        )

    async def __call__(self, ctx: TaskContext, payload: P) -> Any:
        return await self.handler(ctx, payload)


class DuplicateKind(Exception):
    pass


@dataclass
class KindRegistry:
    _kinds: dict[str, TaskKind[Any, Any]] = field(default_factory=dict)
    _names: dict[str, TaskKind[Any, Any]] = field(default_factory=dict)  # names and aliases

    def declare(
        self,
        name: str,
        *,
        payload: type[P],
        result: type[R] | None = None,
        max_attempts: int | None = None,
        aliases: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> Callable[[Handler], TaskKind[P, R]]:
        def register(handler: Handler) -> TaskKind[P, R]:
            location = _location(handler)
            kind: TaskKind[P, R] = TaskKind(
                name=name,
                payload=payload,
                result=result,
                handler=handler,
                location=location,
                max_attempts=max_attempts,
                aliases=tuple(aliases),
                description=inspect.getdoc(handler),
                timeout_s=timeout_s,
            )
            for label in (name, *aliases):
                existing = self._names.get(label)
                if existing is not None:
                    raise DuplicateKind(
                        f"task kind {label!r} is declared twice: at {existing.location} and at {location}"
                    )
            for label in (name, *aliases):
                self._names[label] = kind
            self._kinds[name] = kind
            return kind

        return register

    def get(self, name: str) -> TaskKind[Any, Any] | None:
        return self._names.get(name)

    def all(self) -> list[TaskKind[Any, Any]]:
        return sorted(self._kinds.values(), key=lambda kind: kind.name)


def _location(handler: Handler) -> str:
    try:
        source = inspect.getsourcefile(handler) or "?"
        line = inspect.getsourcelines(handler)[1]
    except (OSError, TypeError):
        return getattr(handler, "__qualname__", repr(handler))
    return f"{source}:{line}"


REGISTRY = KindRegistry()
task_kind = REGISTRY.declare
_BUILTIN_RULES = SubmitRules(kinds=REGISTRY)

# Modules that declare the built-in kinds; importing them registers the kinds (and starts nothing).
BUILTIN_MODULES = ("app.src.api.kinds.builtin", "app.src.api.http.kind")


def load_kinds(modules: tuple[str, ...] | list[str] = ()) -> KindRegistry:
    """Import the built-in kind modules and those TASK_KIND_MODULES names.

    A module that does not exist is a configuration mistake (a typo): one line that names it,
    not an import traceback. A missing import *inside* a kind module is the module's own bug and
    keeps its traceback.
    """
    from app.settings import ConfigurationError

    for module in (*BUILTIN_MODULES, *modules):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise
            raise ConfigurationError(
                f"TASK_KIND_MODULES names {module!r}, which cannot be imported (no module {exc.name!r})"
            ) from None
    return REGISTRY
