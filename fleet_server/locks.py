"""Exactly once across processes: the background leader and short critical sections, on either database.

A server may run as several processes (``run --workers N``, or several hosts on one PostgreSQL), and
each would otherwise run the background loops (rollout ticks, telemetry maintenance, TUF refresh)
and fold telemetry into the rollout aggregates at the same time. Two mechanisms keep that work to
one process at a time:

- :class:`Leadership`: the one process allowed to run the background loops. On PostgreSQL it is a
  session-level advisory lock (``pg_try_advisory_lock``) held on a dedicated connection for as long
  as the process lives: if the process dies, even by ``kill -9``, PostgreSQL ends its session and
  releases the lock, and another process takes it at its next try. On SQLite, whose processes share
  one host, it is an exclusive ``flock`` on a file next to the database (released by the kernel when
  the process exits, however it exits).
- :func:`serialized`: a critical section for work any process may start (the fold, which an operator's
  ``evaluate`` also runs): a transaction-level advisory lock on PostgreSQL (released at commit or
  rollback), a blocking ``flock`` on SQLite (released when the block exits).

``flock`` is used directly (standard library) rather than through a lock library because the
semantics needed are exactly the kernel's: the lock belongs to an open file and dies with the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

log = logging.getLogger("fleet_server.locks")


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"edgefleet:{name}".encode()).digest()[:8], "big", signed=True)


def lock_path(engine: Engine, name: str) -> Path | None:
    """The lock file of ``name`` next to a SQLite database file (None for an in-memory database)."""
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    return Path(database).resolve().with_name(f"{Path(database).name}.{name}.lock")


_memory_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def serialized(session: Session, name: str) -> Iterator[None]:
    """Run the block while no other process (or thread) runs a block of the same ``name`` on this database.

    PostgreSQL: the lock is taken in the session's transaction and released when it ends, so commit
    inside the block. SQLite: the lock file is held until the block exits.
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})
        yield
        return
    engine = bind.engine if hasattr(bind, "engine") else bind
    path = lock_path(engine, name)  # type: ignore[arg-type]
    if path is None:
        with _memory_locks.setdefault(name, threading.Lock()):
            yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Leadership:
    """Whether this process is the one that runs the background loops on ``engine``'s database."""

    NAME = "background"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._file: IO[str] | None = None
        self._connection: Any = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether this process holds the leadership (as of the last :meth:`refresh`)."""
        return self._file is not None or self._connection is not None

    def refresh(self) -> bool:
        """Keep the leadership (checking it is still held) or try to take it; returns whether it is held."""
        with self._lock:
            if self.engine.dialect.name == "postgresql":
                return self._refresh_postgresql()
            return self._refresh_sqlite()

    def release(self) -> None:
        """Give the leadership up (at shutdown)."""
        with self._lock:
            if self._file is not None:
                self._file.close()  # closing the file releases the flock
                self._file = None
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None

    def _refresh_sqlite(self) -> bool:
        if self._file is not None:
            return True
        path = lock_path(self.engine, self.NAME)
        if path is None:
            return True  # an in-memory database has one process by construction
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        log.info("this process (pid %d) runs the background tasks (lock %s)", os.getpid(), path)
        return True

    def _refresh_postgresql(self) -> bool:
        import psycopg

        from fleet_server.services.async_pg import conninfo_for

        if self._connection is not None:
            try:
                self._connection.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lost the database session holding the background leadership")
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None
        try:
            connection = psycopg.connect(conninfo_for(self.engine), autocommit=True, connect_timeout=5)
        except psycopg.Error:
            return False
        try:
            row = connection.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(self.NAME),)).fetchone()
        except psycopg.Error:
            connection.close()
            return False
        if not (row and row[0]):
            connection.close()
            return False
        self._connection = connection
        log.info("this process (pid %d) runs the background tasks (PostgreSQL advisory lock)", os.getpid())
        return True


__all__ = ["Leadership", "lock_key", "lock_path", "serialized"]
