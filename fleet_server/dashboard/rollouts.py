"""The rollout page: waves and cohort progress, gate values over time against their thresholds, the
decision records, and which operator actions the rollout's state allows.

The rollout itself is what ``rollout show`` answers (:func:`fleet_server.rollouts.views.describe_rollout`).
Gate values over time are recomputed from the stored telemetry the way the engine reads it: for each
wave, the windows its released devices sent for the rollout's bundle since the wave started, merged
cumulatively at evenly spaced moments (so each point is what a gate evaluated then would have seen),
and ``install_success`` from when each device reached its final outcome. The thresholds are the
gates' own, or, for a gate relative to the previous version, the value its last evaluation resolved.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.dashboard.charts import Series, Threshold, line_chart, stacked_bar
from fleet_server.rollouts.gates import CohortFigures, Gate, parse_gates
from fleet_server.rollouts.models import Rollout, RolloutDevice, RolloutWave
from fleet_server.rollouts.service import MANUAL_ACTIONS, devices_of, get_rollout, waves_of
from fleet_server.rollouts.states import OPERATOR_EVENTS, ROLLOUT_TRANSITIONS, RolloutState
from fleet_server.rollouts.views import describe_rollout, summarise_rollout
from fleet_server.telemetry.aggregate import merge_windows
from fleet_server.telemetry.query import StoredWindow, baseline_of, stats_of, window_rows

POINTS_PER_WAVE = 24
OUTCOMES = ("healthy", "soaking", "installing", "waiting", "failed", "timed_out")
FINAL_OUTCOMES = ("healthy", "failed", "timed_out")


@dataclass
class WaveView:
    """One wave as the page shows it: the API's view, its progress bar and its gate charts."""

    wave: dict[str, Any]
    progress: Markup
    charts: list[Markup]


@dataclass
class RolloutPage:
    """What the rollout page shows."""

    rollout: dict[str, Any]
    waves: list[WaveView]
    actions: list[str]


def rollout_rows(session: Session) -> list[dict[str, Any]]:
    """Every rollout, newest first."""
    return [summarise_rollout(r) for r in session.scalars(select(Rollout).order_by(Rollout.id.desc()))]


def allowed_actions(state: str) -> list[str]:
    """The operator actions the rollout's state allows, in the order the page shows their buttons."""
    current = RolloutState(state)
    allowed = {e.value for (s, e) in ROLLOUT_TRANSITIONS if s == current and e in OPERATOR_EVENTS}
    return [action for action in MANUAL_ACTIONS if action in allowed]


def rollout_page(session: Session, rollout_id: int, now: dt.datetime) -> RolloutPage:
    """One rollout (a 404-mapped error when unknown)."""
    rollout = get_rollout(session, rollout_id)
    described = describe_rollout(session, rollout, with_devices=True)
    members = [d for d in devices_of(session, rollout.id) if d.membership == "member"]
    gates = parse_gates(list(rollout.policy.get("gates", [])))
    views = []
    for wave, shown in zip(waves_of(session, rollout.id), described["waves"], strict=True):
        in_wave = [m for m in members if m.wave_index == wave.index]
        outcomes = shown["outcomes"]
        progress = stacked_bar([(o, int(outcomes.get(o, 0))) for o in OUTCOMES], shown["devices"])
        views.append(WaveView(shown, progress, _gate_charts(session, rollout, wave, in_wave, gates, now)))
    return RolloutPage(described, views, allowed_actions(rollout.state))


def _gate_charts(
    session: Session, rollout: Rollout, wave: RolloutWave, members: list[RolloutDevice],
    gates: Sequence[Gate], now: dt.datetime,
) -> list[Markup]:  # fmt: skip
    if wave.started_at is None:
        return []
    end = max(wave.finished_at or now, wave.started_at + dt.timedelta(seconds=1))
    moments = [wave.started_at + (end - wave.started_at) * (k / POINTS_PER_WAVE) for k in range(1, POINTS_PER_WAVE + 1)]
    figures = _figures_over_time(session, rollout, wave, members, moments)
    stored = {g.get("gate"): g for g in (wave.evaluation or {}).get("gates", []) if isinstance(g, dict)}
    charts = []
    for gate in gates:
        points = tuple((m.timestamp(), v) for m, f in zip(moments, figures, strict=True)
                       if (v := f.value(gate.metric)) is not None)  # fmt: skip
        threshold = _threshold_of(gate, stored.get(gate.text))
        lines = [Threshold(f"threshold {gate.op}", threshold)] if threshold is not None else []
        title, period = f"wave {wave.index + 1}: {gate.text}", (wave.started_at.timestamp(), end.timestamp())
        charts.append(line_chart(title, [Series(gate.metric, points)], lines, x_range=period))
    return charts


def _threshold_of(gate: Gate, stored: dict[str, Any] | None) -> float | None:
    if not gate.relative:
        return gate.threshold
    value = (stored or {}).get("threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _figures_over_time(
    session: Session, rollout: Rollout, wave: RolloutWave, members: list[RolloutDevice], moments: list[dt.datetime]
) -> list[CohortFigures]:
    """What the wave's gates would have read at each moment: cumulative telemetry and final outcomes."""
    released = [m for m in members if m.released_at is not None]
    version = _version_served(rollout, wave, released)
    rows: list[StoredWindow] = []
    if released:
        ids = [m.device_id for m in released]
        rows = sorted(window_rows(session, rollout.model_name, version, ids, since=wave.started_at),
                      key=lambda r: r.window_end)  # fmt: skip
    baseline = baseline_of(session, rollout.model_name, version)
    merged: dict[str, Any] = {}
    reporting: set[str] = set()
    out, next_row = [], 0
    for index, moment in enumerate(moments):
        last = index == len(moments) - 1
        batch = []
        while next_row < len(rows) and (last or rows[next_row].window_end <= moment):
            batch.append(rows[next_row].payload)
            reporting.add(rows[next_row].device_id)
            next_row += 1
        if batch:
            merged = merge_windows([merged, *batch])
        stats = stats_of(merged, baseline, len(reporting)) if merged else None
        out.append(CohortFigures.from_stats(stats, **_outcomes_at(members, moment)))
    return out


def _version_served(rollout: Rollout, wave: RolloutWave, released: list[RolloutDevice]) -> int:
    """The bundle version whose windows a wave's gates read: a shadow wave's ride on the active version."""
    if not wave.shadow or not released:
        return rollout.bundle_version
    return int(Counter(m.previous_version for m in released).most_common(1)[0][0] or 0)


def _outcomes_at(members: list[RolloutDevice], moment: dt.datetime) -> dict[str, int]:
    final = Counter(m.outcome for m in members
                    if m.outcome in FINAL_OUTCOMES and m.outcome_at is not None and m.outcome_at <= moment)  # fmt: skip
    return {"devices_total": len(members), "devices_healthy": final["healthy"],
            "devices_failed": final["failed"], "devices_timed_out": final["timed_out"]}  # fmt: skip
