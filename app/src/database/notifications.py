"""LISTEN/NOTIFY: one listening connection per process, used as a wake-up hint only.

Notifications are never the source of truth (they are lost while disconnected, and do not pass
through PgBouncer in transaction mode); everything that waits on them also polls or re-reads.

A stalled network never closes a socket, so the connection is probed every PROBE_INTERVAL_S with a
bounded statement; a failed probe or a lost connection reconnects after a backoff that stays
short (RECONNECT_MAX_S), so the process hears notifications again about a second after the
database is back, and everything waiting is woken to re-read what it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from app.src.database.tasks import AVAILABLE_CHANNEL, CANCEL_CHANNEL, EVENTS_CHANNEL

log = structlog.get_logger("taskgate.notifications")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 1.0
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 1.0
# how often a wait re-reads what it waits for: rarely while LISTEN wakes it, often without LISTEN
RECHECK_LISTENING_S = 5.0
RECHECK_POLLING_S = 0.25


class Notifier:
    def __init__(
        self, connect_args: tuple[tuple[Any, ...], dict[str, Any]] | None, *, task_events: bool = True
    ) -> None:
        # a dedicated connection, outside the pools: LISTEN lives as long as the process. None:
        # no connection can LISTEN (behind PgBouncer without DB_LISTEN_URI), every wait polls
        self.listening = connect_args is not None
        self._connect_args, self._connect_kwargs = connect_args or ((), {})
        # Task events (every claim and completion names its tasks) matter only where clients follow
        # tasks (long-polls, event streams): a worker-only process does not take them off the wire.
        self._task_events = task_events
        self._task: asyncio.Task[None] | None = None
        self._watchers: dict[UUID, set[asyncio.Event]] = {}
        self._on_available: list[Callable[[set[int] | None], None]] = []
        self._on_cancel: list[Callable[[UUID], None]] = []
        self._available_watchers: set[asyncio.Event] = set()
        self.connected = asyncio.Event()
        self._stopping = False

    @property
    def recheck_s(self) -> float:
        """The longest a waiter should wait before re-reading the state it waits on."""
        # connected, not configured: while LISTEN is down (a failover, say) nothing wakes waiters
        return RECHECK_LISTENING_S if self.listening and self.connected.is_set() else RECHECK_POLLING_S

    async def start(self) -> None:
        if not self.listening:
            log.info("no LISTEN connection (PgBouncer without DB_LISTEN_URI): waits poll")
            return
        self._task = asyncio.create_task(self._run(), name="taskgate-notifier")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout=5)

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            self._stopping = True
            # asyncio.wait_for (inside asyncpg.connect) can swallow a cancellation that lands as
            # its inner wait finishes; the flag ends the loop at its next turn regardless
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def on_available(self, callback: Callable[[set[int] | None], None]) -> None:
        """callback(queue ids, or None for 'anything may have changed')."""
        self._on_available.append(callback)

    def on_cancel(self, callback: Callable[[UUID], None]) -> None:
        """callback(task id) when a client asks to cancel a running task."""
        self._on_cancel.append(callback)

    @contextlib.contextmanager
    def watch(self, task_id: UUID) -> Any:
        """An Event set whenever the task may have changed; clear it before re-reading."""
        event = asyncio.Event()
        self._watchers.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(task_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[task_id]

    @contextlib.contextmanager
    def watch_available(self) -> Any:
        """An Event set whenever tasks may have become available (a remote worker's long-poll)."""
        event = asyncio.Event()
        self._available_watchers.add(event)
        try:
            yield event
        finally:
            self._available_watchers.discard(event)

    def _wake_everything(self) -> None:
        for callback in self._on_available:
            callback(None)
        for available in self._available_watchers:
            available.set()
        for events in self._watchers.values():
            for event in events:
                event.set()

    def _handle(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if channel == EVENTS_CHANNEL:
            if not self._watchers:
                return
            for part in payload.split(","):
                try:
                    task_id = UUID(part)
                except ValueError:
                    continue
                for event in self._watchers.get(task_id, ()):
                    event.set()
        elif channel == CANCEL_CHANNEL:
            with contextlib.suppress(ValueError):
                task_id = UUID(payload)
                for cancel_callback in self._on_cancel:
                    cancel_callback(task_id)
        elif channel == AVAILABLE_CHANNEL:
            queue_ids = {int(part) for part in payload.split(",") if part.isdigit()} or None
            for callback in self._on_available:
                callback(queue_ids)
            for available in self._available_watchers:
                available.set()

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopping:
            connection: Any = None
            try:
                connection = await asyncpg.connect(
                    *self._connect_args, **self._connect_kwargs, command_timeout=PROBE_TIMEOUT_S
                )
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
                if self._task_events:
                    await connection.add_listener(EVENTS_CHANNEL, self._handle)
                await connection.add_listener(AVAILABLE_CHANNEL, self._handle)
                await connection.add_listener(CANCEL_CHANNEL, self._handle)
                self.connected.set()
                delay = RECONNECT_MIN_S
                self._wake_everything()  # anything sent while we were away is lost: re-check
                await self._until_lost(connection, lost)
                log.warning("notification connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notification connection failed", error=str(exc), retry_in_s=delay)
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    connection.terminate()  # close() would wait on a stalled peer
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    @staticmethod
    async def _until_lost(connection: Any, lost: asyncio.Event) -> None:
        """Return when the connection closed or stopped answering a probe in time."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL_S):
                    await lost.wait()
                return
            await connection.fetchval("SELECT 1", timeout=PROBE_TIMEOUT_S)
