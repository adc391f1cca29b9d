"""Telemetry intake: decompress, bound, validate the basics, and store a batch exactly once.

Each item is stored with its exact JSON text as sent (see ``json_items``), so the JSON work is
done once per item.

The payload of every item is JSON whose shape ``docs/telemetry.md`` defines. Every item is decoded
strictly and walked once (:mod:`.json_guard`: finite numbers, 64-bit integers, valid Unicode text of
bounded length, bounded nesting); metric windows are also checked against their contract
(:func:`bundles.windows.check_window`: counts, sums and histogram sizes), since the rollout engine adds
them up; and the keys we index (``type``, ``model``, ``version``, times, ``capture_reason``) are
checked for type, length and range. A bad item refuses the whole batch with a 400 naming the field
(``windows[2].counters.requests: inf is not a finite number``), so that nothing of it is stored.

Idempotency: a ``telemetry_batches`` row with a unique (device, batch id) is inserted first; if it
already exists the batch is a retry and nothing else is written. Rows are bulk-inserted per table
(:func:`store_batch`: PostgreSQL ``COPY``, SQLite ``executemany``; no ORM objects) because sampled
prediction logs arrive by the thousand. The server on PostgreSQL stores uploads through
:mod:`.telemetry_group_commit` instead (the uploads that arrive together in one statement).
"""

from __future__ import annotations

import datetime as dt
import io
import zlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from bundles.errors import ConfigError
from bundles.windows import check_window
from fleet_server.db import utcnow
from fleet_server.errors import PayloadTooLargeError
from fleet_server.models import TelemetryBatch
from fleet_server.services.json_guard import check_value
from fleet_server.services.json_items import parse_object_with_item_texts

MAX_INDEXED_TEXT = 100
EARLIEST_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
LATEST_TIME = dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)
"""Item times outside these bounds are refused: no device clock is that wrong, and date arithmetic on
the extremes (year 1 or 9999) overflows."""
FOLDED_EVENT_TYPES = frozenset({"install", "heartbeat"})
"""Events the rollout engine reads (``fleet_server.rollouts.fold``); the others are stored as already folded."""
MAX_WINDOW = dt.timedelta(days=1)
"""The longest metric window (the agent's are a minute; its offline buffer merges them up to an hour)."""


@dataclass(frozen=True)
class IntakeResult:
    """What the device is told: rows accepted per kind, and whether this batch was a retry."""

    accepted: dict[str, int]
    duplicate: bool


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The decoded body (identity, gzip or zstd), refusing to inflate past ``max_bytes``."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding == "gzip":
        return _gunzip(body, max_bytes)
    if encoding == "zstd":
        return _unzstd(body, max_bytes)
    raise ConfigError(f"Content-Encoding {encoding!r} is not supported (use gzip or zstd)")


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise ConfigError(f"the gzip body is corrupt ({e})") from e
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"the decompressed telemetry body is over {max_bytes} bytes")
    if not inflater.eof:
        raise ConfigError("the gzip body is truncated")
    return out


def _unzstd(body: bytes, max_bytes: int) -> bytes:
    import zstandard

    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            while chunk := reader.read(65536):
                out += chunk
                if len(out) > max_bytes:
                    raise PayloadTooLargeError(f"the decompressed telemetry body is over {max_bytes} bytes")
    except zstandard.ZstdError as e:
        raise ConfigError(f"the zstd body is corrupt ({e})") from e
    return bytes(out)


KINDS = ("events", "windows", "samples")


@dataclass(frozen=True)
class ParsedBatch:
    """A batch: its id and, per kind, each item with its exact JSON text (stored as the payload)."""

    batch_id: str
    items: dict[str, list[tuple[dict[str, Any], str]]]


def parse_batch(raw: bytes, max_items: int) -> ParsedBatch:
    """The batch, with ``batch_id`` and the three item lists checked for basic types."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"the telemetry body is not UTF-8 ({e})") from e
    fields, lists = parse_object_with_item_texts(text, KINDS)
    batch_id = fields.get("batch_id")
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 64:
        raise ConfigError("batch_id: required, a string of 1 to 64 characters")
    for kind in KINDS:
        if kind in fields and fields[kind] is not None:
            raise ConfigError(f"{kind}: expected a list of objects")
    total = sum(len(items) for items in lists.values())
    if total > max_items:
        raise PayloadTooLargeError(f"the batch has {total} items; the limit is {max_items} per request")
    for kind in KINDS:
        _check_items(kind, lists.get(kind, []))
    return ParsedBatch(batch_id=batch_id, items={kind: lists.get(kind, []) for kind in KINDS})


def _check_items(kind: str, items: list[tuple[Any, str]]) -> None:
    """Each item an object of checked JSON values; windows also against their contract."""
    for i, (item, _) in enumerate(items):
        where = f"{kind}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object")
        check_value(item, where)
        if kind == "windows":
            check_window(item, where)


def _time(item: dict[str, Any], key: str, where: str) -> dt.datetime:
    value = item.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: required, an ISO 8601 time string")
    try:
        parsed = dt.datetime.fromisoformat(value)
        parsed = (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    except (ValueError, OverflowError) as e:
        raise ConfigError(f"{where}.{key}: {value[:40]!r} is not an ISO 8601 time") from e
    if not EARLIEST_TIME <= parsed < LATEST_TIME:
        raise ConfigError(f"{where}.{key}: {value[:40]!r} is outside {EARLIEST_TIME.year} to {LATEST_TIME.year}")
    return parsed


def _text(item: dict[str, Any], key: str, where: str, required: bool, max_chars: int = MAX_INDEXED_TEXT) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_chars or "\x00" in value:
        raise ConfigError(f"{where}.{key}: expected a string of 1 to {max_chars} characters")
    return value


def _version(item: dict[str, Any], where: str, required: bool) -> int | None:
    value = item.get("version")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ConfigError(f"{where}.version: expected a non-negative integer")
    return value


def event_rows(items: list[tuple[dict[str, Any], str]], device_id: str) -> list[dict[str, Any]]:
    """``device_events`` rows (without ``batch_pk``) from the batch's events."""
    rows = []
    for i, (item, text) in enumerate(items):
        where = f"events[{i}]"
        kind = _text(item, "type", where, True, 64)
        rows.append({"device_id": device_id, "type": kind, "model_name": _text(item, "model", where, False),
                     "bundle_version": _version(item, where, False), "at": _time(item, "at", where), "payload": text,
                     "folded": kind not in FOLDED_EVENT_TYPES})  # fmt: skip
    return rows


def window_rows(items: list[tuple[dict[str, Any], str]], device_id: str) -> list[dict[str, Any]]:
    """``metric_windows`` rows from the batch's windows."""
    rows = []
    for i, (item, text) in enumerate(items):
        where = f"windows[{i}]"
        start, end = _time(item, "start", where), _time(item, "end", where)
        if not start <= end <= start + MAX_WINDOW:
            raise ConfigError(f"{where}.end: a window ends at or after its start and lasts at most {MAX_WINDOW}")
        rows.append({"device_id": device_id, "model_name": _text(item, "model", where, True),
                     "bundle_version": _version(item, where, True), "window_start": start, "window_end": end,
                     "payload": text})  # fmt: skip
    return rows


def sample_rows(items: list[tuple[dict[str, Any], str]], device_id: str) -> list[dict[str, Any]]:
    """``prediction_samples`` rows from the batch's samples."""
    rows = []
    for i, (item, text) in enumerate(items):
        where = f"samples[{i}]"
        rows.append({"device_id": device_id, "model_name": _text(item, "model", where, True),
                     "bundle_version": _version(item, where, True),
                     "reason": _text(item, "capture_reason", where, True, 32),
                     "at": _time(item, "at", where), "payload": text})  # fmt: skip
    return rows


def batch_rows(batch: ParsedBatch, device_id: str) -> dict[str, list[dict[str, Any]]]:
    """The batch's rows per kind, their indexed keys checked (a 400 naming the field if one is bad)."""
    return {
        "events": event_rows(batch.items["events"], device_id),
        "windows": window_rows(batch.items["windows"], device_id),
        "samples": sample_rows(batch.items["samples"], device_id),
    }


def store_batch(engine: Engine, device_id: str, batch: ParsedBatch, size_bytes: int) -> IntakeResult:
    """Validate every item, then store the batch and its rows in one transaction (or detect a retry).

    (On PostgreSQL the server stores uploads with :mod:`.telemetry_group_commit` instead.)"""
    rows = batch_rows(batch, device_id)
    counts = {kind: len(kind_rows) for kind, kind_rows in rows.items()}
    try:
        with engine.begin() as connection:
            batch_pk = _insert_batch(connection, device_id, batch.batch_id, counts, size_bytes)
            if batch_pk is None:
                return IntakeResult(accepted=_stored_counts(connection, device_id, batch.batch_id), duplicate=True)
            _insert_rows(connection, rows, batch_pk)
    except SqlIntegrityError:
        # A concurrent retry of the same batch won the race: it is stored exactly once.
        with engine.connect() as connection:
            return IntakeResult(accepted=_stored_counts(connection, device_id, batch.batch_id), duplicate=True)
    return IntakeResult(accepted=counts, duplicate=False)


def _insert_batch(
    connection: Connection, device_id: str, batch_id: str, counts: dict[str, int], size_bytes: int
) -> int | None:
    existing = connection.execute(
        select(TelemetryBatch.id).where(TelemetryBatch.device_id == device_id, TelemetryBatch.batch_id == batch_id)
    ).first()
    if existing is not None:
        return None
    result = connection.execute(
        insert(TelemetryBatch).returning(TelemetryBatch.id),
        {"device_id": device_id, "batch_id": batch_id, "received_at": utcnow(), "events": counts["events"],
         "windows": counts["windows"], "samples": counts["samples"], "size_bytes": size_bytes},
    )  # fmt: skip
    return int(result.scalar_one())


# Column order of the bulk inserts; ``batch_pk`` is filled in per batch.
BULK_COLUMNS: dict[str, tuple[str, ...]] = {
    "device_events": ("batch_pk", "device_id", "type", "model_name", "bundle_version", "at", "payload", "folded"),
    "metric_windows": (
        "batch_pk",
        "device_id",
        "model_name",
        "bundle_version",
        "window_start",
        "window_end",
        "payload",
    ),
    "prediction_samples": ("batch_pk", "device_id", "model_name", "bundle_version", "reason", "at", "payload"),
}
# Built from the constant names above only (never from request data).
SQLITE_INSERT_SQL = {
    table: f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608
    for table, columns in BULK_COLUMNS.items()
}
TABLE_OF_KIND = {"events": "device_events", "windows": "metric_windows", "samples": "prediction_samples"}
# What SQLAlchemy's SQLite DATETIME stores (naive UTC text), so ORM reads see the same values.
SQLITE_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def _insert_rows(connection: Connection, rows: dict[str, list[dict[str, Any]]], batch_pk: int) -> None:
    """Bulk-insert each kind's rows: COPY on PostgreSQL, one executemany on SQLite (no ORM, no per-row SQL)."""
    for kind, kind_rows in rows.items():
        if not kind_rows:
            continue
        table = TABLE_OF_KIND[kind]
        tuples = [_row_tuple(table, row, batch_pk, connection.dialect.name) for row in kind_rows]
        if connection.dialect.name == "postgresql":
            _copy_rows(connection, table, tuples)
        else:
            connection.exec_driver_sql(SQLITE_INSERT_SQL[table], tuples)  # type: ignore[arg-type]


def _row_tuple(table: str, row: dict[str, Any], batch_pk: int, dialect: str) -> tuple[Any, ...]:
    values = {**row, "batch_pk": batch_pk}
    if dialect != "postgresql":
        for key in ("at", "window_start", "window_end"):
            if key in values:
                values[key] = values[key].astimezone(dt.timezone.utc).strftime(SQLITE_DATETIME_FORMAT)
    return tuple(values[column] for column in BULK_COLUMNS[table])


def _copy_rows(connection: Connection, table: str, tuples: list[tuple[Any, ...]]) -> None:
    """PostgreSQL ``COPY ... FROM STDIN`` on the transaction's own driver connection."""
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(f"COPY {table} ({', '.join(BULK_COLUMNS[table])}) FROM STDIN") as copy:
        for values in tuples:
            copy.write_row(values)


def _stored_counts(connection: Connection, device_id: str, batch_id: str) -> dict[str, int]:
    row = connection.execute(
        select(TelemetryBatch.events, TelemetryBatch.windows, TelemetryBatch.samples).where(
            TelemetryBatch.device_id == device_id, TelemetryBatch.batch_id == batch_id
        )
    ).one()
    return {"events": row.events, "windows": row.windows, "samples": row.samples}
