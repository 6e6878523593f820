"""A TCP proxy to PostgreSQL that can freeze: connections stay open, no byte moves either way.

That is what a network partition or a stalled switch looks like to a client — no error, no reset,
just silence — and what timeouts and lease fencing must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit


class FreezableProxy:
    def __init__(self, database_uri: str) -> None:
        parts = urlsplit(database_uri)
        self.database = parts.path.lstrip("/")
        query = parse_qs(parts.query)
        self._socket_dir = query.get("host", [None])[0]
        self._host, self._port = parts.hostname, parts.port or 5432
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def uri(self) -> str:
        """A postgresql+asyncpg URI that goes through the proxy."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        if self._socket_dir:
            upstream = await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._port}")
        else:
            upstream = await asyncio.open_connection(self._host, self._port)
        for source, sink in ((reader, upstream[1]), (upstream[0], writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()
