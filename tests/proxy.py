"""A TCP proxy in front of PostgreSQL that the tests steer: forward, freeze, or refuse.

- frozen: connections stay open and new ones are accepted by the kernel, but no byte moves either
  way: a network partition or a stalled switch as a client sees it (no error, no reset, silence),
  which timeouts and lease fencing must survive;
- refused: the listening socket is closed and every connection reset: a stopped server. `start()`
  listens again on the same port, as a database that came back on its address.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.engine import make_url


class TcpProxy:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 5432, unix_socket: str | None = None) -> None:
        self._target = (host, port)
        self._unix_socket = unix_socket
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._database_url = make_url("postgresql+asyncpg://postgres@127.0.0.1/postgres")
        self.port = 0
        self.accepted = 0  # connections taken so far

    @classmethod
    def to_database(cls, database_uri: str) -> TcpProxy:
        """A proxy to the server of `database_uri` (TCP, or the Unix socket its `host` names)."""
        url = make_url(database_uri)
        socket_dir = url.query.get("host")
        unix_socket = (
            f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
            if isinstance(socket_dir, str) and socket_dir.startswith("/")
            else None
        )
        proxy = cls(host=url.host or "127.0.0.1", port=url.port or 5432, unix_socket=unix_socket)
        proxy._database_url = url
        return proxy

    @property
    def uri(self) -> str:
        """The database URI it was made for, through the proxy."""
        url = self._database_url.set(host="127.0.0.1", port=self.port, query={})
        return url.render_as_string(hide_password=False)

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    async def start(self) -> None:
        """Listen (again on the same port after `refuse()`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.resume()
        self.refuse()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.accepted += 1
        try:
            await self._flowing.wait()
            try:
                if self._unix_socket is not None:
                    up_reader, up_writer = await asyncio.open_unix_connection(self._unix_socket)
                else:
                    up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            self._tasks.update(pumps)
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
                self._tasks.discard(pump)
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
        finally:
            self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                # bytes read just before a freeze are held, not delivered, until it ends
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
