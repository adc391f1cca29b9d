"""Migrations: the schema comes only from Alembic; upgrade from empty and step back down on both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from fleet_server.db import current_revision, downgrade_database, make_engine, upgrade_database
from tests.fleet_server.conftest import _create_pg_database, _drop_pg_database

CORE_TABLES = {"api_keys", "audit_log", "enrollment_tokens", "enrollment_nonces", "devices", "device_tags",
               "device_groups", "device_group_members", "saved_filters", "bundles", "assignments",
               "telemetry_batches", "device_events", "metric_windows", "prediction_samples"}  # fmt: skip
"""The tables of revision 0001."""
MODEL_TABLES = CORE_TABLES | {"bundle_plots"}
"""The tables of ``fleet_server.models``: 0001's and those later revisions added (0011)."""


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path) -> Iterator[str]:
    """A database with no tables at all (its own, so stepping down does not disturb other tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name, url = _create_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _head_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_downgrade_one_step_and_back(empty_database_url):
    assert _tables(empty_database_url) == set()
    upgrade_database(empty_database_url)
    head = _head_revision(empty_database_url)
    assert CORE_TABLES <= _tables(empty_database_url)
    downgrade_database(empty_database_url, "-1")
    assert _head_revision(empty_database_url) != head
    assert CORE_TABLES <= _tables(empty_database_url)  # one step down removes only the newest revision
    upgrade_database(empty_database_url)
    assert _head_revision(empty_database_url) == head


def test_core_revision_downgrades_to_an_empty_schema(empty_database_url):
    upgrade_database(empty_database_url, "0001")
    assert _head_revision(empty_database_url) == "0001" and CORE_TABLES <= _tables(empty_database_url)
    downgrade_database(empty_database_url, "base")
    assert _tables(empty_database_url) <= {"alembic_version"}


def test_models_match_the_migrated_schema(empty_database_url):
    """Autogenerate finds nothing to do: the ORM models and the migrations describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import fleet_server.models  # noqa: F401 - registers the core tables
    from fleet_server.db import Base

    upgrade_database(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    models_diff = [d for d in diff if _table_of(d) in MODEL_TABLES]
    assert models_diff == []


def _table_of(diff) -> str | None:
    item = diff[0] if isinstance(diff, list) else diff
    for part in item[1:]:
        name = getattr(part, "name", None) if hasattr(part, "columns") else None
        table = getattr(part, "table", None)
        if table is not None:
            return table.name
        if name:
            return name
        if isinstance(part, str) and part in MODEL_TABLES:
            return part
    return None
