"""Alembic environment: runs migrations on the URL that ``fleet_server.db.alembic_config`` passes in.

Imports every model module so that ``Base.metadata`` is complete (for autogenerate): the core
``fleet_server.models`` and, when those packages exist, ``fleet_server.telemetry.models`` and
``fleet_server.rollouts.models``.
"""

from __future__ import annotations

import importlib

from alembic import context

from fleet_server.db import Base, make_engine

for _module in ("fleet_server.models", "fleet_server.telemetry.models", "fleet_server.rollouts.models"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as error:
        if error.name is None or not _module.startswith(error.name):
            raise

target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Migrate over a connection given by the caller, or one opened on the configured URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url")
    engine = make_engine(str(url))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: object) -> None:
    is_sqlite = getattr(getattr(connection, "dialect", None), "name", "") == "sqlite"
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them against a database")
run_migrations_online()
