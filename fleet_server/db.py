"""Database plumbing: the declarative ``Base``, engines, sessions and schema migration.

Every table of the fleet server (core, ``fleet_server.telemetry``, ``fleet_server.rollouts``) derives
from :class:`Base`, whose metadata carries a naming convention so that Alembic migrations name
constraints the same way on SQLite and PostgreSQL.

The schema is created ONLY by Alembic migrations (``upgrade_database``); nothing calls
``metadata.create_all``. Migration scripts live inside the package:

- ``fleet_server/migrations/versions/`` (core, revision ``"0001"``),
- ``fleet_server/telemetry/migrations/`` (revision ``"0002"``, when that package exists),
- ``fleet_server/rollouts/migrations/`` (revision ``"0003"``, when that package exists),

all on one linear chain, so ``upgrade_database(url)`` brings any database to ``head``.

URLs: ``sqlite:///path/to/fleet.db`` (embedded default) or ``postgresql+psycopg://user@host/db``
(``postgresql://`` is accepted and mapped to the psycopg 3 driver).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, MetaData, bindparam, create_engine, event, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from bundles.errors import ConfigError

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
VERSION_DIRS = (
    MIGRATIONS_DIR / "versions",
    PACKAGE_DIR / "telemetry" / "migrations",
    PACKAGE_DIR / "rollouts" / "migrations",
)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, _dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(timezone.utc)")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, _dialect: Any) -> dt.datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=dt.timezone.utc)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        """No conversion on PostgreSQL, whose driver returns ``timestamptz`` values timezone-aware already (a
        Python call per value saved: a rollout tick reads some 40,000 of them at 10,000 devices)."""
        if dialect.name == "postgresql":
            return self.impl_instance.result_processor(dialect, coltype)
        return super().result_processor(dialect, coltype)


class Base(DeclarativeBase):
    """Declarative base of every fleet-server table (core, telemetry, rollouts)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


MAX_BOUND_VALUES = 10_000


def among(column: Any, values: Any) -> Any:
    """``column IN values`` for any number of values: past :data:`MAX_BOUND_VALUES`, the values are
    rendered into the statement (safely quoted) instead of bound one parameter each, since PostgreSQL's
    protocol takes at most 65,535 parameters (a rollout to 100,000 devices names more)."""
    values = list(values)
    if len(values) <= MAX_BOUND_VALUES:
        return column.in_(values)
    return column.in_(bindparam("among_values", values, expanding=True, literal_execute=True))


def utcnow() -> dt.datetime:
    """The current time, timezone-aware in UTC (the only kind of datetime the schema stores)."""
    return dt.datetime.now(dt.timezone.utc)


def normalize_url(database_url: str) -> str:
    """Map ``postgresql://`` and ``postgres://`` to the psycopg 3 driver; refuse other dialects."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    if database_url.startswith(("sqlite:///", "postgresql+psycopg://", "sqlite://")):
        return database_url
    raise ConfigError(f"database URL {database_url!r} is not sqlite:/// or postgresql://")


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    """WAL and a busy timeout so that the API and background tasks share one SQLite file safely."""

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    return on_connect


def private_sqlite_file(url: str) -> None:
    """Create the SQLite file of ``url`` with mode 0600 (tightening an existing one).

    It holds token and key hashes, device inventories and telemetry; SQLite gives its ``-wal`` and
    ``-shm`` files the same mode.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.parent.is_dir():
        return  # SQLite reports the missing directory itself
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


def make_engine(database_url: str, pool_size: int = 10, sqlite_busy_timeout_ms: int = 10_000) -> Engine:
    """An engine for a SQLite file or a PostgreSQL server, tuned for the API's short transactions.

    On SQLite the pool has no overflow limit: a SQLite connection is a file handle, and a request
    that must wait for the database then waits in one place only, SQLite's busy handler, for the
    documented ``busy_timeout`` (then a 503). A bounded pool made requests queue for a connection
    behind holders that were themselves waiting for the write lock (30 s, then a 500).
    """
    url = normalize_url(database_url)
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, pool_size=pool_size, max_overflow=-1, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_busy_timeout_ms))
        return engine
    # No pre-ping (a round trip per checkout on the poll path): a dropped connection fails one request
    # with a 503 and SQLAlchemy then replaces the whole pool; ``pool_recycle`` retires idle connections.
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_recycle=1800)


def make_sqlite_reader(engine: Engine, busy_timeout_ms: int) -> Engine | None:
    """A read-only engine of its own on ``engine``'s SQLite file (None for an in-memory database).

    For the reads that run inline on the event loop (the desired-state poll): one at a time, so its
    connection is always back in this pool when the next one comes, and taking it never waits (no
    overflow limit), whereas waiting for the shared pool there stalls every request of the process,
    and an overflow connection of the shared pool would be opened and closed on the event loop.
    ``query_only`` makes any write through it an error.
    """
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    reader = create_engine(engine.url, pool_size=2, max_overflow=-1, connect_args={"check_same_thread": False})

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    event.listen(reader, "connect", on_connect)
    return reader


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (API handlers read them afterwards)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(database_url: str) -> Any:
    """An Alembic ``Config`` pointing at the package's migrations (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    locations = [str(path) for path in VERSION_DIRS if path.is_dir()]
    config.set_main_option("version_locations", " ".join(locations))
    config.set_main_option("path_separator", "space")
    config.attributes["database_url"] = normalize_url(database_url)
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest); the only way tables are created."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade_database(database_url: str, revision: str) -> None:
    """Step the schema back to ``revision`` (``"-1"`` for one step)."""
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
