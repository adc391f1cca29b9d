"""A small pool of asyncio psycopg connections for the desired-state poll on PostgreSQL.

On PostgreSQL a poll spends most of its time waiting for the database's answer. Awaiting it on an
asyncio connection lets one server process keep many polls in flight at once instead of blocking
its event loop (or a worker thread) per round trip. Connections are autocommit (one round trip per
poll, no BEGIN/COMMIT) and psycopg prepares the repeated statement server-side by itself.

asyncio connections belong to the event loop that opened them, so there is one pool per running
loop (tests create a loop per client; a server has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Engine


def conninfo_for(engine: Engine) -> str:
    """A libpq URI for the engine's database (the SQLAlchemy driver suffix removed)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncPgPool:
    """Up to ``size`` autocommit ``psycopg.AsyncConnection`` per event loop, opened on demand."""

    def __init__(self, conninfo: str, size: int = 8) -> None:
        self.conninfo = conninfo
        self.size = size
        self._idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Queue[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._opened: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()

    async def fetchall(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run one query on a pooled connection; a broken connection is dropped, not returned."""
        async with self.connection() as connection:
            return await run_query(connection, sql, params)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection for a few statements; dropped (not returned) if anything raised meanwhile."""
        connection = await self._acquire()
        try:
            yield connection
        except BaseException:
            await self._discard(connection)
            raise
        self._queue().put_nowait(connection)

    def _queue(self) -> asyncio.Queue[Any]:
        loop = asyncio.get_running_loop()
        if loop not in self._idle:
            self._idle[loop] = asyncio.Queue()
            self._opened[loop] = 0
        return self._idle[loop]

    async def _acquire(self) -> Any:
        import psycopg

        queue, loop = self._queue(), asyncio.get_running_loop()
        if queue.empty() and self._opened[loop] < self.size:
            self._opened[loop] += 1
            try:
                return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            except BaseException:
                self._opened[loop] -= 1
                raise
        return await queue.get()

    async def _discard(self, connection: Any) -> None:
        self._opened[asyncio.get_running_loop()] -= 1
        try:
            await connection.close()
        except Exception:  # noqa: S110 - already broken; closing is best effort
            pass

    async def close(self) -> None:
        """Close this loop's idle connections (at shutdown)."""
        queue = self._queue()
        while not queue.empty():
            await self._discard(queue.get_nowait())


async def run_query(connection: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One statement on ``connection`` (autocommit: its own transaction); its rows."""
    async with connection.cursor() as cursor:
        await cursor.execute(sql, params)
        return [tuple(row) for row in await cursor.fetchall()]
