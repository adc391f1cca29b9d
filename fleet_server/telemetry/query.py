"""Queries over stored telemetry: cohort numbers, per-device and per-version views.

Everything is computed from the raw ``metric_windows`` rows (merged by addition, see
``aggregate``) and the bundle's drift baseline in ``bundles.manifest``; nothing here writes. The
merge is total: payloads are read as text and parsed here (:func:`stored_json`: a payload that does not
parse, integers past Python's 4,300 digits or nesting past the recursion limit included, reads as
nothing), and a stored window that breaks the window contract (``bundles.windows.check_window``) is
left out and counted as ``invalid_windows``, so no stored row can turn a query into an error.
The rollout engine reads the same figures from its rollups (``fleet_server.rollouts.fold``) through
:func:`stats_of`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Text, cast, delete, select
from sqlalchemy.orm import Session

from bundles import jsonio
from bundles.errors import ConfigError
from bundles.windows import TOKENS_PER_S_EDGES, merge_valid
from fleet_server.models import BundleRecord, DeviceEvent, MetricWindow, PredictionSample
from fleet_server.services.json_guard import printable_json
from fleet_server.telemetry.aggregate import counter, latency_percentile, psi_by_feature


@dataclass(frozen=True)
class CohortStats:
    """Health of one bundle version on a set of devices since a time (what rollout gates read)."""

    devices_reporting: int
    requests: int
    errors: int
    fallbacks: int
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    psi_max_input: float | None
    psi_output: float | None
    shadow_agreement: float | None
    shadow_samples: int
    invalid_windows: int = 0
    generations: int = 0
    """Language models: generations answered locally, and their TTFT p95 and decode-speed median."""
    ttft_p95_ms: float | None = None
    tokens_per_s_p50: float | None = None

    @property
    def error_rate(self) -> float | None:
        """Errors per request, None without requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        """Fallback answers per request, None without requests."""
        return self.fallbacks / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate, "fallback_rate": self.fallback_rate}


def stored_json(text: Any) -> Any:
    """A stored JSON payload (read as text) parsed, or None when it does not parse; never raises.

    The ORM's JSON columns parse with :func:`json.loads`, which raises on what intake now refuses but older
    rows may hold (an integer of 5,000 digits, nesting 3,000 deep): reads that aggregate stored payloads
    parse them here instead."""
    if not isinstance(text, str):
        return text
    try:
        return jsonio.loads(text)
    except (ValueError, RecursionError):
        return None


@dataclass(frozen=True)
class StoredWindow:
    """A stored metric window, its payload parsed by :func:`stored_json` (None when it does not parse)."""

    device_id: str
    bundle_version: int
    window_start: dt.datetime
    window_end: dt.datetime
    payload: Any


def window_rows(
    session: Session,
    model: str,
    version: int | None = None,
    device_ids: Sequence[str] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[StoredWindow]:
    """The metric windows of ``model`` (optionally one version, some devices, a time range)."""
    columns = (MetricWindow.device_id, MetricWindow.bundle_version, MetricWindow.window_start, MetricWindow.window_end)
    query = select(*columns, cast(MetricWindow.payload, Text)).where(MetricWindow.model_name == model)
    if version is not None:
        query = query.where(MetricWindow.bundle_version == version)
    if device_ids is not None:
        query = query.where(MetricWindow.device_id.in_(list(device_ids)))
    if since is not None:
        query = query.where(MetricWindow.window_end > since)
    if until is not None:
        query = query.where(MetricWindow.window_start < until)
    return [StoredWindow(*row[:4], stored_json(row[4])) for row in session.execute(query)]


def baseline_of(session: Session, model: str, version: int) -> dict[str, Any]:
    """The drift baseline of a published bundle version (``{}`` when unknown)."""
    record = session.scalar(select(BundleRecord).where(BundleRecord.name == model, BundleRecord.version == version))
    if record is None:
        return {}
    baseline = (record.manifest or {}).get("drift_baseline") or {}
    return dict(baseline)


def stats_of(merged: dict[str, Any], baseline: dict[str, Any], devices: int) -> CohortStats:
    """Turn a merged window and a baseline into :class:`CohortStats`."""
    latency = (merged.get("latency_ms") or {}).get("counts") or []
    psis = psi_by_feature(merged, baseline)
    inputs = [v for k, v in psis.items() if not k.startswith("output:")]
    outputs = [v for k, v in psis.items() if k.startswith("output:")]
    shadow = merged.get("shadow") or {}
    compared = int(shadow.get("compared", 0))
    return CohortStats(
        devices_reporting=devices,
        requests=counter(merged, "requests"),
        errors=counter(merged, "errors"),
        fallbacks=counter(merged, "fallbacks"),
        latency_p95_ms=latency_percentile(latency, 0.95),
        latency_p99_ms=latency_percentile(latency, 0.99),
        psi_max_input=max(inputs) if inputs else None,
        psi_output=max(outputs) if outputs else None,
        shadow_agreement=(int(shadow.get("agreed", 0)) / compared) if compared else None,
        shadow_samples=compared,
        **_llm_stats(merged.get("llm") or {}),
    )


def _llm_stats(llm: dict[str, Any]) -> dict[str, Any]:
    """Generations, TTFT p95 and decode tokens/s p50 of a merged window's ``llm`` field."""
    return {
        "generations": int(llm.get("generations", 0) or 0),
        "ttft_p95_ms": latency_percentile((llm.get("ttft_ms") or {}).get("counts") or [], 0.95),
        "tokens_per_s_p50": latency_percentile(
            (llm.get("tokens_per_s") or {}).get("counts") or [], 0.5, TOKENS_PER_S_EDGES
        ),
    }


def cohort_stats(
    session: Session, model: str, version: int, device_ids: Sequence[str], since: dt.datetime
) -> CohortStats:
    """Health of ``model@version`` on ``device_ids`` from windows that end after ``since``."""
    rows = window_rows(session, model, version, device_ids, since)
    merged, invalid = merge_valid(row.payload for row in rows)
    stats = stats_of(merged, baseline_of(session, model, version), len({row.device_id for row in rows}))
    return CohortStats(**{**stats.__dict__, "invalid_windows": invalid})


# --- summaries: per version, per device, fleet-wide ------------------------------------------------

GROUPINGS = ("version", "device", "fleet", "variant")
_LABELS = {"device": ("device_id", "version"), "variant": ("version", "variant")}


def summarize(
    session: Session, model: str, since: dt.datetime, until: dt.datetime | None = None, by: str = "version"
) -> list[dict[str, Any]]:
    """Aggregates of ``model`` per bundle version, per (device, version), per (version, variant), or fleet-wide.

    ``variant`` groups each device's windows under the variant it reported installing for that version
    (its latest ``install`` event with result ``installed``; ``unknown`` when it reported none), so the
    TFLite variant on some boards and the ONNX variant on others are seen apart.
    """
    if by not in GROUPINGS:
        raise ConfigError(f"group by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    rows_found = window_rows(session, model, since=since, until=until)
    variants = installed_variants(session, model, {r.device_id for r in rows_found}) if by == "variant" else {}
    groups: dict[tuple[Any, ...], list[StoredWindow]] = {}
    for row in rows_found:
        key = (row.bundle_version, variants.get((row.device_id, row.bundle_version), "unknown"))
        groups.setdefault(key if by == "variant" else _group_key(row, by), []).append(row)
    out = []
    for key, rows in sorted(groups.items()):
        versions = sorted({r.bundle_version for r in rows})
        baseline = baseline_of(session, model, versions[0]) if len(versions) == 1 else {}
        merged, invalid = merge_valid(r.payload for r in rows)
        stats = stats_of(merged, baseline, len({r.device_id for r in rows}))
        label = dict(zip(_LABELS.get(by, ("version",)), key, strict=False))
        out.append({"model": model, **label, **stats.to_dict(), "invalid_windows": invalid})
    return out


def _group_key(row: StoredWindow, by: str) -> tuple[Any, ...]:
    if by == "version":
        return (row.bundle_version,)
    if by == "device":
        return (row.device_id, row.bundle_version)
    return ()


def installed_variants(session: Session, model: str, device_ids: set[str]) -> dict[tuple[str, int], str]:
    """(device, version) -> the variant the device last reported installing for ``model@version``."""
    if not device_ids:
        return {}
    query = (
        select(DeviceEvent.device_id, DeviceEvent.bundle_version, cast(DeviceEvent.payload, Text))
        .where(DeviceEvent.type == "install", DeviceEvent.model_name == model,
               DeviceEvent.device_id.in_(sorted(device_ids)))
        .order_by(DeviceEvent.at, DeviceEvent.id)
    )  # fmt: skip
    found: dict[tuple[str, int], str] = {}
    for device_id, version, text in session.execute(query):
        payload = stored_json(text)
        payload = payload if isinstance(payload, dict) else {}
        variant = payload.get("variant")
        if version is not None and payload.get("result") == "installed" and isinstance(variant, str):
            found[(device_id, int(version))] = variant
    return found


# --- sampled prediction logs -----------------------------------------------------------------------


@dataclass(frozen=True)
class SampleFilter:
    """Which sampled logs to read (every field optional)."""

    model: str | None = None
    version: int | None = None
    device_id: str | None = None
    reason: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


@dataclass(frozen=True)
class StoredSample:
    """A stored sampled prediction log, its payload parsed by :func:`stored_json` (None when it does not parse)."""

    id: int
    device_id: str
    model_name: str
    bundle_version: int
    reason: str
    at: dt.datetime
    payload: Any


def samples(session: Session, where: SampleFilter, limit: int = 1000) -> list[StoredSample]:
    """Sampled prediction logs matching ``where``, newest first, at most ``limit`` (payloads read as text and
    parsed by :func:`stored_json`, like windows)."""
    columns = (PredictionSample.id, PredictionSample.device_id, PredictionSample.model_name,
               PredictionSample.bundle_version, PredictionSample.reason, PredictionSample.at)  # fmt: skip
    query = select(*columns, cast(PredictionSample.payload, Text))
    query = query.order_by(PredictionSample.at.desc(), PredictionSample.id.desc())
    for column, value in (
        (PredictionSample.model_name, where.model),
        (PredictionSample.bundle_version, where.version),
        (PredictionSample.device_id, where.device_id),
        (PredictionSample.reason, where.reason),
    ):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(PredictionSample.at >= where.since)
    if where.until is not None:
        query = query.where(PredictionSample.at < where.until)
    return [StoredSample(*row[:6], stored_json(row[6])) for row in session.execute(query.limit(limit))]


def sample_dict(row: StoredSample) -> dict[str, Any]:
    """A stored sample as the API shows it: indexed columns plus the device's payload (as it can always be answered:
    ``json_guard.printable_json``; a payload that is not an object shows nothing)."""
    payload = printable_json(row.payload) if isinstance(row.payload, dict) else {}
    return {
        "id": row.id,
        "device_id": row.device_id,
        "model": row.model_name,
        "version": row.bundle_version,
        "reason": row.reason,
        "at": row.at.isoformat(),
        "inclusion_probability": payload.get("inclusion_probability"),
        "source": payload.get("source"),
        "latency_ms": payload.get("latency_ms"),
        "fallback_reason": payload.get("fallback_reason"),
        "confidence": payload.get("confidence"),
        "inputs": payload.get("inputs"),
        "outputs": payload.get("outputs"),
        "redacted": payload.get("redacted"),
    }


PARQUET_COLUMNS = (
    "id", "device_id", "model", "version", "reason", "at", "inclusion_probability", "source", "latency_ms",
    "fallback_reason", "confidence", "sample_id", "inputs_json", "outputs_json", "redacted",
)  # fmt: skip


def samples_to_parquet(rows: Sequence[StoredSample], out: Any) -> int:
    """Write samples to Parquet (``out``: a path or a binary file); tensors as JSON text columns.

    One row per sample with ``inclusion_probability`` as a column, so an offline analysis can weight
    each row by ``1 / inclusion_probability`` and join labels on ``sample_id``. Returns the row count.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for row in rows:
        data = sample_dict(row)
        for key in ("inclusion_probability", "latency_ms", "confidence"):  # a stored value of another type: null
            data[key] = _number(data[key])
        for key in ("source", "fallback_reason"):
            data[key] = data[key] if isinstance(data[key], str) else None
        sample_id = (row.payload if isinstance(row.payload, dict) else {}).get("id")
        records.append({**data, "at": row.at, "sample_id": sample_id if isinstance(sample_id, str) else None,
                        "inputs_json": json.dumps(data.pop("inputs")), "outputs_json": json.dumps(data.pop("outputs")),
                        "redacted": ",".join(map(str, redacted)) if isinstance(redacted := data.get("redacted"), list)
                        else ""})  # fmt: skip
    schema = pa.schema([
        ("id", pa.int64()), ("device_id", pa.string()), ("model", pa.string()), ("version", pa.int64()),
        ("reason", pa.string()), ("at", pa.timestamp("us", tz="UTC")), ("inclusion_probability", pa.float64()),
        ("source", pa.string()), ("latency_ms", pa.float64()), ("fallback_reason", pa.string()),
        ("confidence", pa.float64()), ("sample_id", pa.string()), ("inputs_json", pa.string()),
        ("outputs_json", pa.string()), ("redacted", pa.string()),
    ])  # fmt: skip
    table = pa.Table.from_pylist([{k: r.get(k) for k in PARQUET_COLUMNS} for r in records], schema=schema)
    pq.write_table(table, out, compression="zstd")
    return len(records)


def _number(value: Any) -> float | None:
    """A number column's value (a stored value of another type, from before intake checked samples, is null)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- retention -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """How long raw telemetry is kept (days). Aggregates are computed from the raw rows, so a longer
    window retention keeps longer history; samples are the bulky part."""

    windows_days: int = 90
    samples_days: int = 30
    events_days: int = 365


def prune(session: Session, retention: Retention, now: dt.datetime | None = None) -> dict[str, int]:
    """Delete telemetry rows older than the retention limits; returns rows deleted per table."""
    now = now or dt.datetime.now(dt.timezone.utc)
    plans = (
        ("metric_windows", MetricWindow, MetricWindow.window_end, retention.windows_days),
        ("prediction_samples", PredictionSample, PredictionSample.at, retention.samples_days),
        ("device_events", DeviceEvent, DeviceEvent.at, retention.events_days),
    )
    deleted: dict[str, int] = {}
    for name, table, column, days in plans:
        result = session.execute(delete(table).where(column < now - dt.timedelta(days=days)))
        deleted[name] = int(getattr(result, "rowcount", 0) or 0)
    return deleted
