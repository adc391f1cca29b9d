"""Telemetry tables (schema revision ``0002``): drift monitors and drift alerts.

Raw telemetry rows live in the core tables (``metric_windows``, ``prediction_samples``,
``device_events``, written by intake); these tables hold what the telemetry package derives.

- ``drift_monitors``: per-model overrides of the PSI thresholds (defaults 0.1 warn, 0.25 alert),
  the look-back window and the minimum number of rows before a PSI is trusted.
- ``drift_alerts``: one row per (model, version, feature) whose PSI crossed a threshold in an
  evaluation; ``feature`` is ``"output:<name>"`` for the output distribution. An alert stays open
  (``resolved_at`` null) until an evaluation finds the PSI back under the warn level.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.db import Base, utcnow

DEFAULT_WARN_PSI = 0.1
DEFAULT_ALERT_PSI = 0.25
DEFAULT_LOOKBACK_S = 3600
DEFAULT_MIN_ROWS = 200
LEVELS = ("warn", "alert")


class DriftMonitor(Base):
    """Per-model drift settings; a model without a row uses the defaults."""

    __tablename__ = "drift_monitors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(100), unique=True)
    warn_psi: Mapped[float] = mapped_column(Float, default=DEFAULT_WARN_PSI)
    alert_psi: Mapped[float] = mapped_column(Float, default=DEFAULT_ALERT_PSI)
    lookback_s: Mapped[int] = mapped_column(Integer, default=DEFAULT_LOOKBACK_S)
    min_rows: Mapped[int] = mapped_column(Integer, default=DEFAULT_MIN_ROWS)
    enabled: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DriftAlert(Base):
    """A PSI over a monitor's threshold for one feature (or the output) of one bundle version."""

    __tablename__ = "drift_alerts"
    __table_args__ = (Index("ix_drift_alerts_model_version_feature", "model_name", "bundle_version", "feature"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(100))
    bundle_version: Mapped[int]
    feature: Mapped[str] = mapped_column(String(200))
    level: Mapped[str] = mapped_column(String(16))
    psi: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    rows: Mapped[int]
    window_start: Mapped[dt.datetime]
    window_end: Mapped[dt.datetime]
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[dt.datetime | None]
