"""What ``rollout show`` and the API answer: a rollout with its waves, progress, gates and decisions.

Plain dicts with stable keys (the API's JSON and the CLI's ``--json``); times as ISO 8601 strings.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.service import devices_of, waves_of


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 or None."""
    return value.isoformat() if value is not None else None


def summarise_rollout(rollout: Rollout) -> dict[str, Any]:
    """The one-line view of a rollout (``rollout list``)."""
    return {
        "id": rollout.id,
        "bundle": f"{rollout.model_name}@{rollout.bundle_version}",
        "model": rollout.model_name,
        "version": rollout.bundle_version,
        "state": rollout.state,
        "current_wave": rollout.current_wave,
        "targets": list(rollout.target.get("targets", [])),
        "created_by": rollout.created_by,
        "created_at": iso(rollout.created_at),
        "state_changed_at": iso(rollout.state_changed_at),
        "evaluated_at": iso(rollout.evaluated_at),
    }


def describe_rollout(session: Session, rollout: Rollout, with_devices: bool = False) -> dict[str, Any]:
    """Everything about a rollout: policy, waves with progress and gate values, devices out, decisions."""
    devices = devices_of(session, rollout.id)
    out = summarise_rollout(rollout)
    out["policy"] = dict(rollout.policy)
    out["devices"] = dict(Counter(d.membership for d in devices))
    out["waves"] = [_wave(w, devices) for w in waves_of(session, rollout.id)]
    out["not_in_rollout"] = [
        {"device_id": d.device_id, "membership": d.membership, "reason": d.reason}
        for d in devices
        if d.membership != "member"
    ]
    out["decisions"] = [_decision(d) for d in decisions_of(session, rollout.id)]
    if with_devices:
        out["device_detail"] = [describe_device(d) for d in devices if d.membership == "member"]
    return out


def decisions_of(session: Session, rollout_id: int) -> list[RolloutDecision]:
    """A rollout's decision records, oldest first."""
    query = select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id).order_by(RolloutDecision.id)
    return list(session.scalars(query))


def _wave(wave: RolloutWave, devices: list[RolloutDevice]) -> dict[str, Any]:
    members = [d for d in devices if d.membership == "member" and d.wave_index == wave.index]
    evaluation = wave.evaluation or {}
    return {
        "index": wave.index,
        "number": wave.index + 1,
        "spec": wave.spec,
        "shadow": wave.shadow,
        "state": wave.state,
        "planned_devices": wave.planned_devices,
        "devices": len(members),
        "released": sum(1 for d in members if d.released_at is not None),
        "outcomes": dict(Counter(d.outcome or "waiting" for d in members)),
        "started_at": iso(wave.started_at),
        "settled_at": iso(wave.settled_at),
        "finished_at": iso(wave.finished_at),
        "deadline_at": iso(wave.deadline_at),
        "evaluated_at": evaluation.get("at"),
        "last_evaluation": evaluation.get("reason"),
        "gates": evaluation.get("gates", []),
        "canary": evaluation.get("canary"),
        "control": evaluation.get("control"),
        "by_variant": evaluation.get("by_variant") or {},
    }


def _decision(decision: RolloutDecision) -> dict[str, Any]:
    return {
        "id": decision.id,
        "at": iso(decision.at),
        "actor": decision.actor,
        "action": decision.action,
        "wave": None if decision.wave_index is None else decision.wave_index + 1,
        "from_state": decision.from_state,
        "to_state": decision.to_state,
        "reason": decision.reason,
        "record": decision.record,
    }


def describe_device(device: RolloutDevice) -> dict[str, Any]:
    """One member's progress."""
    return {
        "device_id": device.device_id,
        "wave": None if device.wave_index is None else device.wave_index + 1,
        "variant": device.variant,
        "previous_version": device.previous_version,
        "released_at": iso(device.released_at),
        "start_after": iso(device.start_after),
        "running_since": iso(device.running_since),
        "outcome": device.outcome or "waiting",
        "outcome_reason": device.outcome_reason,
        "restored_at": iso(device.restored_at),
    }
