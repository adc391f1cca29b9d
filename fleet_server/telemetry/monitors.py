"""Drift monitors and alerts: PSI per feature and output, against the bundle's baseline, per version.

A model is monitored with the defaults (warn at PSI 0.1, alert at 0.25, over the last hour, once at
least 200 rows were seen) unless a ``drift_monitors`` row overrides them. :func:`evaluate` merges the
windows of the look-back period per bundle version, computes PSI for every baseline feature and the
output, opens (or updates) a ``drift_alerts`` row for each one at or over the warn level, and resolves
open alerts whose PSI went back under it. The evaluation is idempotent: running it twice on the same
data leaves the same alerts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bundles.errors import ConfigError
from fleet_server.db import utcnow
from fleet_server.models import MetricWindow
from fleet_server.telemetry.aggregate import merge_windows, psi_by_feature
from fleet_server.telemetry.models import (
    DEFAULT_ALERT_PSI,
    DEFAULT_LOOKBACK_S,
    DEFAULT_MIN_ROWS,
    DEFAULT_WARN_PSI,
    DriftAlert,
    DriftMonitor,
)
from fleet_server.telemetry.query import StoredWindow, baseline_of, window_rows


@dataclass(frozen=True)
class MonitorSettings:
    """The thresholds a model is monitored with (its override, else the defaults)."""

    model: str
    warn_psi: float = DEFAULT_WARN_PSI
    alert_psi: float = DEFAULT_ALERT_PSI
    lookback_s: int = DEFAULT_LOOKBACK_S
    min_rows: int = DEFAULT_MIN_ROWS
    enabled: bool = True
    overridden: bool = False

    def level_of(self, psi: float) -> str | None:
        """``alert``, ``warn`` or None for a PSI value."""
        if psi >= self.alert_psi:
            return "alert"
        if psi >= self.warn_psi:
            return "warn"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersionDrift:
    """PSI per feature (and ``output:<name>``) of one version over a period, with its row count."""

    model: str
    version: int
    rows: int
    psi: dict[str, float]
    levels: dict[str, str]
    window_start: dt.datetime
    window_end: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        times = {"window_start": self.window_start.isoformat(), "window_end": self.window_end.isoformat()}
        return {**asdict(self), **times}


def monitor_settings(session: Session, model: str) -> MonitorSettings:
    """The settings ``model`` is monitored with."""
    row = session.scalar(select(DriftMonitor).where(DriftMonitor.model_name == model))
    if row is None:
        return MonitorSettings(model)
    return MonitorSettings(model, row.warn_psi, row.alert_psi, row.lookback_s, row.min_rows, row.enabled, True)


def set_monitor(
    session: Session,
    model: str,
    warn_psi: float | None = None,
    alert_psi: float | None = None,
    lookback_s: int | None = None,
    min_rows: int | None = None,
    enabled: bool | None = None,
) -> MonitorSettings:
    """Override the thresholds of ``model`` (unset values keep their current value)."""
    current = monitor_settings(session, model)
    merged = MonitorSettings(
        model,
        current.warn_psi if warn_psi is None else warn_psi,
        current.alert_psi if alert_psi is None else alert_psi,
        current.lookback_s if lookback_s is None else lookback_s,
        current.min_rows if min_rows is None else min_rows,
        current.enabled if enabled is None else enabled,
        True,
    )
    _check(merged)
    row = session.scalar(select(DriftMonitor).where(DriftMonitor.model_name == model)) or DriftMonitor(model_name=model)
    row.warn_psi, row.alert_psi, row.lookback_s = merged.warn_psi, merged.alert_psi, merged.lookback_s
    row.min_rows, row.enabled = merged.min_rows, merged.enabled
    session.add(row)
    session.flush()
    return merged


def _check(settings: MonitorSettings) -> None:
    if not 0 < settings.warn_psi <= settings.alert_psi:
        got = f"warn {settings.warn_psi}, alert {settings.alert_psi}"
        raise ConfigError(f"drift thresholds need 0 < warn <= alert, got {got}")
    if settings.lookback_s <= 0 or settings.min_rows < 0:
        raise ConfigError("drift look-back must be positive and min rows non-negative")


def drift_by_version(
    session: Session, model: str, since: dt.datetime, until: dt.datetime, settings: MonitorSettings | None = None
) -> list[VersionDrift]:
    """PSI per feature and output for every version of ``model`` that reported in [since, until)."""
    settings = settings or monitor_settings(session, model)
    rows = window_rows(session, model, since=since, until=until)
    by_version: dict[int, list[StoredWindow]] = {}
    for row in rows:
        by_version.setdefault(row.bundle_version, []).append(row)
    out = []
    for version, windows in sorted(by_version.items()):
        merged = merge_windows(w.payload for w in windows)
        psi = psi_by_feature(merged, baseline_of(session, model, version))
        levels = {k: level for k, v in psi.items() if (level := settings.level_of(v)) is not None}
        rows_seen = int((merged.get("counters") or {}).get("rows", 0))
        out.append(VersionDrift(model, version, rows_seen, psi, levels, since, until))
    return out


def evaluate(session: Session, model: str, now: dt.datetime | None = None) -> list[DriftAlert]:
    """Evaluate the monitor of ``model``: open, update or resolve alerts. Returns the open alerts."""
    settings = monitor_settings(session, model)
    now = now or utcnow()
    if settings.enabled:
        since = now - dt.timedelta(seconds=settings.lookback_s)
        for drift in drift_by_version(session, model, since, now, settings):
            if drift.rows >= settings.min_rows:
                _apply(session, settings, drift, now)
    session.flush()
    return list_alerts(session, model, open_only=True)


def _apply(session: Session, settings: MonitorSettings, drift: VersionDrift, now: dt.datetime) -> None:
    open_alerts = {
        a.feature: a
        for a in session.scalars(
            select(DriftAlert).where(
                DriftAlert.model_name == drift.model,
                DriftAlert.bundle_version == drift.version,
                DriftAlert.resolved_at.is_(None),
            )
        )
    }
    for feature, psi in drift.psi.items():
        level = drift.levels.get(feature)
        alert = open_alerts.get(feature)
        if level is None:
            if alert is not None:
                alert.resolved_at, alert.psi, alert.updated_at = now, psi, now
            continue
        threshold = settings.alert_psi if level == "alert" else settings.warn_psi
        if alert is None:
            alert = DriftAlert(model_name=drift.model, bundle_version=drift.version, feature=feature, opened_at=now)
            session.add(alert)
        alert.level, alert.psi, alert.threshold, alert.rows = level, psi, threshold, drift.rows
        alert.window_start, alert.window_end, alert.updated_at = drift.window_start, drift.window_end, now


def list_alerts(session: Session, model: str | None = None, open_only: bool = True) -> list[DriftAlert]:
    """Alerts, newest first (open ones only by default)."""
    query = select(DriftAlert).order_by(DriftAlert.opened_at.desc(), DriftAlert.id.desc())
    if model is not None:
        query = query.where(DriftAlert.model_name == model)
    if open_only:
        query = query.where(DriftAlert.resolved_at.is_(None))
    return list(session.scalars(query))


def alert_dict(alert: DriftAlert) -> dict[str, Any]:
    """An alert as JSON-ready data (API and CLI)."""
    return {
        "id": alert.id,
        "model": alert.model_name,
        "version": alert.bundle_version,
        "feature": alert.feature,
        "level": alert.level,
        "psi": round(alert.psi, 4),
        "threshold": alert.threshold,
        "rows": alert.rows,
        "window_start": alert.window_start.isoformat(),
        "window_end": alert.window_end.isoformat(),
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


def monitored_models(session: Session, since: dt.datetime) -> list[str]:
    """Models that reported windows since ``since`` (what a periodic evaluation walks)."""
    query = select(MetricWindow.model_name).where(MetricWindow.window_end > since).distinct()
    return sorted(session.scalars(query))


def evaluate_all(session: Session, now: dt.datetime | None = None, lookback_s: int = 86_400) -> list[DriftAlert]:
    """Evaluate every model that reported in the last ``lookback_s`` (for a periodic server task)."""
    now = now or utcnow()
    alerts: list[DriftAlert] = []
    for model in monitored_models(session, now - dt.timedelta(seconds=lookback_s)):
        alerts += evaluate(session, model, now)
    return alerts
