"""Queries over stored telemetry: cohort numbers for rollout gates, per-device and per-version views.

Everything is computed from the raw ``metric_windows`` rows (merged by addition, see
``aggregate``) and the bundle's drift baseline in ``bundles.manifest``; nothing here writes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.models import BundleRecord, MetricWindow
from fleet_server.telemetry.aggregate import counter, latency_percentile, merge_windows, psi_by_feature


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


def window_rows(
    session: Session,
    model: str,
    version: int | None = None,
    device_ids: Sequence[str] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[MetricWindow]:
    """The metric windows of ``model`` (optionally one version, some devices, a time range)."""
    query = select(MetricWindow).where(MetricWindow.model_name == model)
    if version is not None:
        query = query.where(MetricWindow.bundle_version == version)
    if device_ids is not None:
        query = query.where(MetricWindow.device_id.in_(list(device_ids)))
    if since is not None:
        query = query.where(MetricWindow.window_end > since)
    if until is not None:
        query = query.where(MetricWindow.window_start < until)
    return list(session.scalars(query))


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
    )


def cohort_stats(
    session: Session, model: str, version: int, device_ids: Sequence[str], since: dt.datetime
) -> CohortStats:
    """Health of ``model@version`` on ``device_ids`` from windows that end after ``since``."""
    rows = window_rows(session, model, version, device_ids, since)
    merged = merge_windows(row.payload for row in rows)
    return stats_of(merged, baseline_of(session, model, version), len({row.device_id for row in rows}))
