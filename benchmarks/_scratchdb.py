"""A fresh, migrated database for one benchmark run: a SQLite file, or a PostgreSQL database to drop after."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PG_ADMIN_URL = os.environ.get("EDGEFLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def create_database(backend: str, work: Path, prefix: str = "edgefleet_bench") -> tuple[str, str | None]:
    """A fresh, migrated database; returns (url, postgres database name to drop or None)."""
    from fleet_server.db import upgrade_database

    if backend == "sqlite":
        url = f"sqlite:///{work / 'fleet.db'}"
        upgrade_database(url)
        return url, None
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    upgrade_database(url)
    return url, name


def drop_database(name: str | None) -> None:
    """Drop a PostgreSQL database made by :func:`create_database` (nothing for SQLite)."""
    if name is None:
        return
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
