"""Taskgate's Python SDK: enqueue and follow tasks, and run remote workers, over HTTPS."""

from taskgate import webhooks
from taskgate.client import AsyncClient, Client
from taskgate.errors import (
    ApiError,
    ChildFailed,
    PermanentError,
    RetryLater,
    SignalTimeout,
    TaskCancelled,
    TaskgateError,
    TimeoutExceeded,
)
from taskgate.models import Attempt, BlockedBy, Kind, Queue, Schedule, Task, TaskEvent, TaskPage, WorkerInfo
from taskgate.worker import Child, TaskContext, Worker

__version__ = "0.1.0"
__all__ = [
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BlockedBy",
    "Child",
    "ChildFailed",
    "Client",
    "Kind",
    "PermanentError",
    "Queue",
    "RetryLater",
    "Schedule",
    "SignalTimeout",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskEvent",
    "TaskPage",
    "TaskgateError",
    "TimeoutExceeded",
    "Worker",
    "WorkerInfo",
    "webhooks",
]
