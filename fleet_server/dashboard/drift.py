"""The drift page: PSI per input feature and output over time, one line per bundle version, against the
model's warn and alert levels, with the open alerts.

Each point is :func:`fleet_server.telemetry.monitors.drift_by_version` over one slice of the period
(the same computation as ``edgefleet-server drift``, against each version's own training baseline),
so a point is the drift of what devices saw in that slice. Slices with fewer rows than the monitor's
``min_rows`` are still drawn (the table marks how many rows each version had): PSI on a small sample
reads high with no drift at all (``docs/rollouts.md``, Limits).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.dashboard.charts import Series, Threshold, line_chart
from fleet_server.models import BundleRecord
from fleet_server.telemetry.monitors import (
    MonitorSettings,
    VersionDrift,
    alert_dict,
    drift_by_version,
    list_alerts,
    monitor_settings,
)

SLICES = 24
PERIODS_H = (1, 6, 24, 168)


@dataclass
class DriftPage:
    """What the drift page shows for one model."""

    model: str
    hours: int
    monitor: MonitorSettings
    charts: list[Markup]
    latest: list[dict[str, Any]]
    alerts: list[dict[str, Any]]


def drift_models(session: Session) -> list[str]:
    """Models with a published bundle (the drift page's index)."""
    return list(session.scalars(select(BundleRecord.name).distinct().order_by(BundleRecord.name)))


def drift_page(session: Session, model: str, hours: int, now: dt.datetime) -> DriftPage:
    """PSI per feature over the last ``hours``, in :data:`SLICES` slices."""
    settings = monitor_settings(session, model)
    since = now - dt.timedelta(hours=hours)
    step = (now - since) / SLICES
    slices = [(since + step * k, since + step * (k + 1)) for k in range(SLICES)]
    points: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for start, end in slices:
        for drift in drift_by_version(session, model, start, end, settings):
            for feature, value in drift.psi.items():
                points.setdefault(feature, {}).setdefault(drift.version, []).append((end.timestamp(), value))
    levels = [Threshold("warn", settings.warn_psi, "warn"), Threshold("alert", settings.alert_psi, "alert")]
    period = (since.timestamp(), now.timestamp())
    charts = [
        line_chart(
            f"PSI {feature}", [Series(f"v{v}", tuple(p)) for v, p in sorted(by_version.items())], levels, x_range=period
        )  # fmt: skip
        for feature, by_version in sorted(points.items(), key=lambda item: _feature_order(item[0]))
    ]
    latest = [_latest(d) for d in drift_by_version(session, model, since, now, settings)]
    alerts = [alert_dict(a) for a in list_alerts(session, model, open_only=True)]
    return DriftPage(model, hours, settings, charts, latest, alerts)


def _feature_order(name: str) -> tuple[int, str]:
    """Inputs first, then outputs (``output:<name>``), each by name."""
    return (1 if name.startswith("output:") else 0, name)


def _latest(drift: VersionDrift) -> dict[str, Any]:
    worst = max(drift.psi.items(), key=lambda item: item[1], default=(None, None))
    return {"version": drift.version, "rows": drift.rows, "psi": dict(sorted(drift.psi.items())),
            "levels": drift.levels, "worst_feature": worst[0], "worst_psi": worst[1]}  # fmt: skip
