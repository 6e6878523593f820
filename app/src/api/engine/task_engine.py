"""TaskEngine: what every way of creating or settling a task in one process shares.

The runtime builds one at start (`TaskEngine.start`), after the database, and hands it to the
routes, the scheduler and the worker; tests build their own over a test database. Services reach
the caches and the insert coalescer only through it, never through attributes of the Database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from app.database import Database, StorageUnavailable
from app.settings import Settings
from app.src.api.engine.caches import QueueCache, QuotaCache
from app.src.api.models.http import ALLOWED_NETWORKS_CONTEXT
from app.src.api.models.tasks import Task
from app.src.database import tasks as task_store
from app.src.database.tasks import NewTask
from app.src.utils.coalesce import Coalescer

# The deployment default of CLIENT_MAX_QUEUED_TASKS, for rules made without settings.
DEFAULT_MAX_QUEUED_TASKS: int = Settings.model_fields["CLIENT_MAX_QUEUED_TASKS"].default
DEFAULT_MAX_QUEUES: int = Settings.model_fields["CLIENT_MAX_QUEUES"].default


class KindContract(Protocol):
    """What submit needs of a task kind (app.src.api.kinds.TaskKind is one)."""

    @property
    def name(self) -> str: ...

    @property
    def max_attempts(self) -> int | None: ...

    def validate_payload(self, payload: Any, *, context: Mapping[str, Any] | None = None) -> Any: ...


class KindLookup(Protocol):
    """Kinds by name or alias (app.src.api.kinds.REGISTRY is one)."""

    def get(self, name: str) -> KindContract | None: ...


class _NoKinds:
    def get(self, name: str) -> KindContract | None:
        return None


@dataclass(frozen=True, slots=True)
class SubmitRules:
    """The deployment's enqueue rules, fixed when the process starts.

    `payload_context` is the pydantic validation context of payloads (the networks the `http`
    kind may reach); workers validate with the same one, so a payload valid at enqueue is valid
    when it runs.
    """

    kinds: KindLookup = field(default_factory=_NoKinds)
    default_max_queued_tasks: int = DEFAULT_MAX_QUEUED_TASKS
    max_queues: int = DEFAULT_MAX_QUEUES  # per client: an enqueue or PUT past it is refused
    payload_context: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    default_priority: int = 5

    @classmethod
    def from_settings(cls, settings: Settings, *, kinds: KindLookup) -> SubmitRules:
        return cls(
            kinds=kinds,
            default_max_queued_tasks=settings.CLIENT_MAX_QUEUED_TASKS,
            max_queues=settings.CLIENT_MAX_QUEUES,
            payload_context=MappingProxyType(
                {ALLOWED_NETWORKS_CONTEXT: tuple(settings.HTTP_ALLOWED_NETWORKS)}
            ),
        )


class TaskEngine:
    """The rules, the caches of queue settings and quota counts, and the insert coalescer."""

    def __init__(self, db: Database, rules: SubmitRules) -> None:
        self.db = db
        self.rules = rules
        self.queues = QueueCache(db)
        self.quotas = QuotaCache(db)
        # single enqueues of concurrent requests share one INSERT (group commit); a batch that
        # cannot finish within one checkout and one statement fails its callers with 503
        self.task_inserts: Coalescer[NewTask, Task] = Coalescer(
            self._insert_tasks,
            deadline_s=db.acquire_timeout_s + db.command_timeout_s,
            on_deadline=lambda: StorageUnavailable("the database did not store the tasks in time"),
        )

    def clear_caches(self) -> None:
        self.queues.clear()
        self.quotas.clear()

    async def close(self, *, timeout_s: float | None = None) -> None:
        """Wait for the insert batch in flight (after requests have stopped arriving), at most
        `timeout_s` (see Coalescer.close)."""
        await self.task_inserts.close(timeout_s=timeout_s)

    async def _insert_tasks(self, tasks: Sequence[NewTask]) -> list[Task]:
        async with self.db.driver() as conn:
            return await task_store.insert_tasks(conn, tasks)
