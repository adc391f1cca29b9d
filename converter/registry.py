"""The local model registry: SQLite through SQLAlchemy 2.

Three tables. ``model_versions``: one immutable row per registered version (name, version, source
kind and stored files, hashes of source / eval / calibration data, tool versions, the declared
spec as JSON). ``conversions``: one row per successful conversion of a version (every rung of the
ladder with its measurements and verdict, the bundle's path and hash). ``publications``: where a
conversion's bundle was published. SQLite triggers refuse UPDATE and DELETE on ``model_versions``
so a registered version can never change under a published bundle.

Writes are transactions; files belonging to a row are staged in a temporary directory and renamed
into place before the commit, and removed again if the commit fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from bundles.errors import ConfigError
from converter.home import Home
from converter.spec import ModelSpec


class Base(DeclarativeBase):
    pass


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32))
    source_kind: Mapped[str] = mapped_column(String(32))
    source_ref: Mapped[str] = mapped_column(Text)
    source_files: Mapped[str] = mapped_column(Text)  # JSON list of paths relative to the artifacts dir
    source_sha256: Mapped[str] = mapped_column(String(64))
    eval_file: Mapped[str] = mapped_column(Text)
    eval_sha256: Mapped[str] = mapped_column(String(64))
    calibration_file: Mapped[str] = mapped_column(Text, default="")
    calibration_sha256: Mapped[str] = mapped_column(String(64), default="")
    spec_json: Mapped[str] = mapped_column(Text)
    tool_versions_json: Mapped[str] = mapped_column(Text)


class ConversionRow(Base):
    __tablename__ = "conversions"
    __table_args__ = (UniqueConstraint("model_version_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    number: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32))
    options_json: Mapped[str] = mapped_column(Text)
    results_json: Mapped[str] = mapped_column(Text)
    bundle_file: Mapped[str] = mapped_column(Text)
    bundle_sha256: Mapped[str] = mapped_column(String(64))


class PublicationRow(Base):
    __tablename__ = "publications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversion_id: Mapped[int] = mapped_column(ForeignKey("conversions.id"))
    published_at: Mapped[str] = mapped_column(String(32))
    destination: Mapped[str] = mapped_column(Text)
    targets_json: Mapped[str] = mapped_column(Text)


_IMMUTABLE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS model_versions_no_update BEFORE UPDATE ON model_versions "
    "BEGIN SELECT RAISE(ABORT, 'registered model versions are immutable'); END",
    "CREATE TRIGGER IF NOT EXISTS model_versions_no_delete BEFORE DELETE ON model_versions "
    "BEGIN SELECT RAISE(ABORT, 'registered model versions are immutable'); END",
)


@dataclass(frozen=True)
class ModelVersion:
    """A registered version as plain data (detached from the session)."""

    id: int
    name: str
    version: int
    created_at: str
    source_kind: str
    source_ref: str
    source_files: tuple[str, ...]
    source_sha256: str
    eval_file: str
    eval_sha256: str
    calibration_file: str
    calibration_sha256: str
    spec: ModelSpec
    tool_versions: dict[str, str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, row: ModelVersionRow) -> ModelVersion:
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            created_at=row.created_at,
            source_kind=row.source_kind,
            source_ref=row.source_ref,
            source_files=tuple(json.loads(row.source_files)),
            source_sha256=row.source_sha256,
            eval_file=row.eval_file,
            eval_sha256=row.eval_sha256,
            calibration_file=row.calibration_file,
            calibration_sha256=row.calibration_sha256,
            spec=ModelSpec.from_dict(json.loads(row.spec_json)),
            tool_versions=json.loads(row.tool_versions_json),
        )


@dataclass(frozen=True)
class Conversion:
    """A recorded conversion: options, every rung's result, and the bundle it produced."""

    id: int
    number: int
    created_at: str
    options: dict[str, Any]
    results: list[dict[str, Any]]
    bundle_file: str
    bundle_sha256: str

    @classmethod
    def from_row(cls, row: ConversionRow) -> Conversion:
        return cls(
            id=row.id,
            number=row.number,
            created_at=row.created_at,
            options=json.loads(row.options_json),
            results=json.loads(row.results_json),
            bundle_file=row.bundle_file,
            bundle_sha256=row.bundle_sha256,
        )


def utc_now() -> str:
    """Now in UTC, ISO 8601 with seconds and a ``Z``: the persisted timestamp form."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Registry:
    """Read and append-only access to the registry database of one :class:`Home`."""

    def __init__(self, home: Home) -> None:
        home.ensure()
        self.home = home
        self.engine: Engine = create_engine(home.database_url)
        event.listen(self.engine, "connect", _enable_foreign_keys)
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as connection:
            for statement in _IMMUTABLE_TRIGGERS:
                connection.execute(text(statement))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits at the end of the block and rolls back if it raises."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def next_version(self, session: Session, name: str) -> int:
        current = session.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name))
        return 1 if current is None else int(current) + 1

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The given version, or the latest one; ConfigError naming the model if there is none."""
        with Session(self.engine) as session:
            query = select(ModelVersionRow).where(ModelVersionRow.name == name)
            if version is not None:
                query = query.where(ModelVersionRow.version == version)
            row = session.scalars(query.order_by(ModelVersionRow.version.desc())).first()
            if row is None:
                which = f"{name}@{version}" if version is not None else name
                raise ConfigError(f"model {which} is not registered (see 'edgefleet-convert list')")
            return ModelVersion.from_row(row)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        with Session(self.engine) as session:
            query = select(ModelVersionRow).order_by(ModelVersionRow.name, ModelVersionRow.version)
            if name is not None:
                query = query.where(ModelVersionRow.name == name)
            return [ModelVersion.from_row(r) for r in session.scalars(query)]

    def conversions(self, model: ModelVersion) -> list[Conversion]:
        with Session(self.engine) as session:
            query = select(ConversionRow).where(ConversionRow.model_version_id == model.id)
            return [Conversion.from_row(r) for r in session.scalars(query.order_by(ConversionRow.number))]

    def latest_conversion(self, model: ModelVersion, number: int | None = None) -> Conversion:
        """The latest conversion of ``model``, or conversion ``number``; ConfigError if there is none."""
        found = self.conversions(model)
        if not found:
            raise ConfigError(f"model {model.ref} has no conversion yet (run 'edgefleet-convert convert {model.name}')")
        if number is None:
            return found[-1]
        for conversion in found:
            if conversion.number == number:
                return conversion
        raise ConfigError(f"model {model.ref} has no conversion {number} (it has 1..{found[-1].number})")

    def next_conversion_number(self, session: Session, model: ModelVersion) -> int:
        query = select(func.max(ConversionRow.number)).where(ConversionRow.model_version_id == model.id)
        current = session.scalar(query)
        return 1 if current is None else int(current) + 1

    def publications(self, conversion: Conversion) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            query = select(PublicationRow).where(PublicationRow.conversion_id == conversion.id)
            return [
                {"published_at": r.published_at, "destination": r.destination, "targets": json.loads(r.targets_json)}
                for r in session.scalars(query.order_by(PublicationRow.id))
            ]

    def record_publication(self, conversion: Conversion, destination: str, targets: list[str]) -> None:
        with self.transaction() as session:
            session.add(
                PublicationRow(
                    conversion_id=conversion.id,
                    published_at=utc_now(),
                    destination=destination,
                    targets_json=json.dumps(targets),
                )
            )


def _enable_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
