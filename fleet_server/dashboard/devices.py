"""One device: inventory, assignments, install history, health and recent sampled predictions.

Everything shown here was sent by the device (inventory, events, samples) and is hostile until
escaped: the templates print it as text only (Jinja autoescaping), and tensors are shown as
truncated JSON text, never as markup.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.models import DeviceEvent, MetricWindow
from fleet_server.rollouts.models import Rollout, RolloutDevice
from fleet_server.services.fleet import describe_assignment, device_detail, list_assignments
from fleet_server.services.json_guard import printable_json
from fleet_server.telemetry.query import SampleFilter, cohort_stats, sample_dict, samples

HEALTH_LOOKBACK_S = 86_400
INSTALL_EVENTS = 50
OTHER_EVENTS = 20
SAMPLES = 20
TENSOR_TEXT_CHARS = 240


@dataclass
class DevicePage:
    """What the device page shows."""

    device: dict[str, Any]
    assignments: list[dict[str, Any]]
    installs: list[dict[str, Any]]
    heartbeat: dict[str, Any] | None
    events: list[dict[str, Any]]
    health: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]


def device_page(session: Session, device_id: str, now: dt.datetime) -> DevicePage:
    """Everything about one device (a 404-mapped error when it does not exist)."""
    device = device_detail(session, device_id)
    heartbeats = _events(session, device_id, ("heartbeat",), 1)
    return DevicePage(
        device=device,
        assignments=[describe_assignment(a) for a in list_assignments(session, device_id=device_id)],
        installs=_events(session, device_id, ("install",), INSTALL_EVENTS),
        heartbeat=heartbeats[0] if heartbeats else None,
        events=_events(session, device_id, ("error", "breaker", "drops"), OTHER_EVENTS),
        health=_health(session, device_id, now - dt.timedelta(seconds=HEALTH_LOOKBACK_S)),
        samples=[_sample_row(s) for s in samples(session, SampleFilter(device_id=device_id), limit=SAMPLES)],
        rollouts=_rollouts(session, device_id),
    )


def _events(session: Session, device_id: str, types: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
    query = (
        select(DeviceEvent)
        .where(DeviceEvent.device_id == device_id, DeviceEvent.type.in_(types))
        .order_by(DeviceEvent.at.desc(), DeviceEvent.id.desc())
        .limit(limit)
    )
    return [{"type": e.type, "at": e.at, "model": e.model_name, "version": e.bundle_version,
             "payload": printable_json(e.payload) if isinstance(e.payload, dict) else {}}
            for e in session.scalars(query)]  # fmt: skip


def _health(session: Session, device_id: str, since: dt.datetime) -> list[dict[str, Any]]:
    """Per model and version this device served since ``since``: requests, error rate, latency, drift."""
    pairs = session.execute(
        select(MetricWindow.model_name, MetricWindow.bundle_version)
        .where(MetricWindow.device_id == device_id, MetricWindow.window_end > since)
        .distinct()
    )
    out = []
    for model, version in sorted(pairs):
        stats = cohort_stats(session, model, version, [device_id], since)
        out.append({"model": model, "version": version, **stats.to_dict()})
    return out


def _sample_row(row: Any) -> dict[str, Any]:
    sample = sample_dict(row)
    sample["inputs_text"] = tensor_text(sample.get("inputs"))
    sample["outputs_text"] = tensor_text(sample.get("outputs"))
    return sample


def tensor_text(tensors: Any) -> str:
    """Tensors as compact JSON text, cut to :data:`TENSOR_TEXT_CHARS` (the page is not a data export)."""
    if tensors is None:
        return "-"
    text = json.dumps(tensors, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= TENSOR_TEXT_CHARS else text[: TENSOR_TEXT_CHARS - 1] + "…"


def _rollouts(session: Session, device_id: str) -> list[dict[str, Any]]:
    query = (
        select(RolloutDevice, Rollout)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.device_id == device_id)
        .order_by(Rollout.id.desc())
        .limit(20)
    )
    return [{"id": r.id, "bundle": f"{r.model_name}@{r.bundle_version}", "state": r.state,
             "membership": d.membership, "wave": None if d.wave_index is None else d.wave_index + 1,
             "outcome": d.outcome or ("waiting" if d.membership == "member" else d.reason)}
            for d, r in session.execute(query)]  # fmt: skip
