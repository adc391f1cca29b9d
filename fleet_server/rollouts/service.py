"""Creating rollouts and the manual controls: approve, pause, resume, abort, roll back, pin.

Every change goes through the state tables of :mod:`.states`, appends a decision record (who, what,
from which state to which, why, with the numbers) and an audit-log entry in the same transaction.
Creation resolves the target set, classifies every device (member / incompatible / pinned /
excluded), refuses devices already held by another active rollout of the same model with a 409 that
names it, records the tuple each member runs now (for rollback), and plans the cohorts.

Rollback directs every device the rollout touched back to the tuple it ran before (the bundle
version is the whole tuple: model files, schemas, processing, runtime config), checked against the
previous bundle's variants, and only where the device's assignment is still this rollout's (a newer
pin is never overwritten). A device that ran nothing before has its assignment removed.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from bundles.errors import ConfigError, EdgeFleetError
from fleet_server import audit
from fleet_server.db import among, utcnow
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import Assignment, Device
from fleet_server.rollouts import assign
from fleet_server.rollouts.cohorts import plan_cohorts
from fleet_server.rollouts.decisions import Action
from fleet_server.rollouts.gates import parse_gates
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.spec import RolloutPolicy
from fleet_server.rollouts.states import (
    ACTIVE_STATES,
    TERMINAL_WAVE_STATES,
    RolloutEvent,
    RolloutState,
    RolloutStateError,
    WaveEvent,
    WaveState,
    next_rollout_state,
    next_wave_state,
)
from fleet_server.rollouts.targets import (
    Placement,
    load_manifest,
    place_devices,
    place_on_capabilities,
    resolve_targets,
)

ENGINE_ACTOR = "engine"
MANUAL_ACTIONS = ("start", "approve", "pause", "resume", "abort", "rollback")
BREACH_ACTIONS = frozenset({Action.PAUSE_ON_BREACH.value, Action.PAUSE_NO_DATA.value})


@dataclass(frozen=True)
class CreateRequest:
    """What ``rollout create`` asks for."""

    model: str
    version: int
    targets: tuple[str, ...]
    policy: RolloutPolicy
    draft: bool = False


# --- reading ---------------------------------------------------------------------------------------


def get_rollout(session: Session, rollout_id: int, lock: bool = False) -> Rollout:
    """The rollout row (locked for update when ``lock``), or a 404."""
    query = select(Rollout).where(Rollout.id == rollout_id)
    rollout = session.scalar(query.with_for_update() if lock else query)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    return rollout


def waves_of(session: Session, rollout_id: int) -> list[RolloutWave]:
    """A rollout's waves in order."""
    query = select(RolloutWave).where(RolloutWave.rollout_id == rollout_id).order_by(RolloutWave.index)
    return list(session.scalars(query))


def devices_of(session: Session, rollout_id: int, wave_index: int | None = None) -> list[RolloutDevice]:
    """A rollout's devices (members of one wave when ``wave_index`` is given)."""
    query = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
    if wave_index is not None:
        query = query.where(RolloutDevice.wave_index == wave_index, RolloutDevice.membership == "member")
    return list(session.scalars(query.order_by(RolloutDevice.device_id)))


def policy_of(rollout: Rollout) -> RolloutPolicy:
    """The rollout's stored policy."""
    return RolloutPolicy.from_dict(rollout.policy)


# --- decisions and state changes -------------------------------------------------------------------


def change_state(
    session: Session,
    rollout: Rollout,
    event: RolloutEvent,
    *,
    actor: str,
    action: str,
    reason: str,
    record: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> RolloutDecision:
    """Move the rollout through its table and store the decision record and the audit entry.

    The state is written with a conditional UPDATE (``WHERE state = <the state we read>``), so when
    two processes act on the same rollout at once (SQLite has no row lock) one wins and the other
    gets a 409 instead of both recording a transition.
    """
    before = rollout.state
    target = next_rollout_state(rollout.state, event, rollout.id).value
    changed_at = now or utcnow()
    moved: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Rollout).where(Rollout.id == rollout.id, Rollout.state == before)
        .values(state=target, state_changed_at=changed_at).execution_options(synchronize_session=False)
    )  # fmt: skip
    if moved.rowcount != 1:
        session.refresh(rollout)
        raise RolloutStateError(f"cannot {event.value} rollout {rollout.id}: it changed to {rollout.state} meanwhile")
    set_committed_value(rollout, "state", target)
    set_committed_value(rollout, "state_changed_at", changed_at)
    return add_decision(session, rollout, actor=actor, action=action, reason=reason, record=record or {},
                        from_state=before, now=now)  # fmt: skip


def add_decision(
    session: Session,
    rollout: Rollout,
    *,
    actor: str,
    action: str,
    reason: str,
    record: dict[str, Any],
    from_state: str | None = None,
    now: dt.datetime | None = None,
) -> RolloutDecision:
    """Append a decision record (and its audit entry) without changing the state by itself."""
    decision = RolloutDecision(
        rollout_id=rollout.id, at=now or utcnow(), actor=actor, action=action, wave_index=rollout.current_wave,
        from_state=from_state or rollout.state, to_state=rollout.state, reason=reason, record=record,
    )  # fmt: skip
    session.add(decision)
    audit.record(
        session, actor=actor, action=f"rollout.{action}", target_type="rollout", target_id=str(rollout.id),
        before={"state": decision.from_state}, after={"state": rollout.state, "reason": reason[:500]},
    )  # fmt: skip
    return decision


def last_decision(session: Session, rollout_id: int) -> RolloutDecision | None:
    """The newest decision record of a rollout."""
    query = select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id)
    return session.scalar(query.order_by(RolloutDecision.id.desc()).limit(1))


def set_wave_state(wave: RolloutWave, event: WaveEvent, now: dt.datetime) -> None:
    """Move a wave through its table, stamping the matching clock."""
    wave.state = next_wave_state(wave.state, event).value
    if event is WaveEvent.START:
        wave.started_at = now
    elif event is WaveEvent.SETTLED:
        wave.settled_at = now
    elif wave.state in TERMINAL_WAVE_STATES:
        wave.finished_at = now


def cancel_open_waves(session: Session, rollout: Rollout, now: dt.datetime) -> None:
    """Mark every wave that has not finished as cancelled (abort, rollback)."""
    for wave in waves_of(session, rollout.id):
        if WaveState(wave.state) not in TERMINAL_WAVE_STATES:
            set_wave_state(wave, WaveEvent.CANCEL, now)


# --- creating --------------------------------------------------------------------------------------


def create_rollout(session: Session, request: CreateRequest, actor: str, now: dt.datetime | None = None) -> Rollout:
    """Validate, classify the target set, refuse conflicts, store the rollout and its cohorts."""
    now = now or utcnow()
    parse_gates(list(request.policy.gates))
    manifest = load_manifest(session, request.model, request.version, new_assignment=True)
    placements = place_devices(session, manifest, resolve_targets(session, request.targets),
                               preferences=request.policy.variant_preferences)  # fmt: skip
    members = [p for p in placements if p.membership == "member"]
    if not members:
        raise ConfigError(f"no device of the target set can take {manifest.ref}: {_summarise_out(placements)}")
    refuse_conflicts(session, request.model, [p.device_id for p in members])
    rollout = Rollout(
        model_name=request.model, bundle_version=request.version, state=RolloutState.DRAFT.value,
        policy=request.policy.to_dict(), target={"targets": list(request.targets)}, created_by=actor,
        created_at=now, state_changed_at=now, current_wave=0,
    )  # fmt: skip
    session.add(rollout)
    session.flush()
    _store_plan(session, rollout, request.policy, placements)
    add_decision(session, rollout, actor=actor, action="create", reason=_creation_summary(rollout, placements),
                 record={"placements": dict(Counter(p.membership for p in placements))}, now=now)  # fmt: skip
    if not request.draft:
        start_rollout(session, rollout, actor, now)
    return rollout


def start_rollout(session: Session, rollout: Rollout, actor: str, now: dt.datetime) -> None:
    """Draft -> running, or -> awaiting approval when the policy wants approval before the first wave."""
    if policy_of(rollout).approval in ("start", "each_wave"):
        change_state(session, rollout, RolloutEvent.SUBMIT, actor=actor, action="submit",
                     reason="waiting for approval to start", now=now)  # fmt: skip
    else:
        change_state(session, rollout, RolloutEvent.START, actor=actor, action="start", reason="started", now=now)


def refuse_conflicts(session: Session, model: str, device_ids: Sequence[str]) -> None:
    """A 409 naming the rollout(s) that already hold any of these devices for ``model``."""
    query = (
        select(RolloutDevice.rollout_id, Rollout.state, RolloutDevice.device_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.model_name == model, Rollout.state.in_([s.value for s in ACTIVE_STATES]),
               RolloutDevice.membership == "member", among(RolloutDevice.device_id, device_ids))
    )  # fmt: skip
    held: dict[tuple[int, str], list[str]] = {}
    for rollout_id, state, device_id in session.execute(query).tuples():
        held.setdefault((rollout_id, state), []).append(device_id)
    if held:
        parts = [
            f"{len(ids)} device(s) ({_sample(ids)}) are in rollout {rid} of {model}, which is {state}"
            for (rid, state), ids in sorted(held.items())
        ]
        rule = "one active rollout per model and device; finish, abort or roll it back first"
        raise ConflictError("; ".join(parts) + ": " + rule)


def _store_plan(session: Session, rollout: Rollout, policy: RolloutPolicy, placements: Sequence[Placement]) -> None:
    members = [p for p in placements if p.membership == "member"]
    cohorts = plan_cohorts([p.device_id for p in members], rollout.id, policy.waves)
    wave_of = {device_id: index for index, cohort in enumerate(cohorts) for device_id in cohort}
    previous = assign.previous_tuples(session, rollout.model_name, [p.device_id for p in members])
    for index, (spec, cohort) in enumerate(zip(policy.waves, cohorts, strict=True)):
        session.add(RolloutWave(rollout_id=rollout.id, index=index, spec=spec.text, shadow=spec.shadow,
                                state=WaveState.PENDING.value, planned_devices=len(cohort)))  # fmt: skip
    for p in placements:
        prev_version, prev_variant, prev_rollout = previous.get(p.device_id, (None, None, None))
        session.add(RolloutDevice(
            rollout_id=rollout.id, device_id=p.device_id, membership=p.membership, reason=p.reason,
            wave_index=wave_of.get(p.device_id), variant=p.variant, previous_version=prev_version,
            previous_variant=prev_variant, previous_rollout_id=prev_rollout, outcome_reason="",
        ))  # fmt: skip


def _creation_summary(rollout: Rollout, placements: Sequence[Placement]) -> str:
    counts = Counter(p.membership for p in placements)
    out = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"created for {rollout.model_name}@{rollout.bundle_version}: {out}"


def _summarise_out(placements: Sequence[Placement]) -> str:
    if not placements:
        return "the target set names no device"
    return "; ".join(f"{p.device_id} {p.membership}: {p.reason}" for p in placements[:5]) + (
        f" (and {len(placements) - 5} more)" if len(placements) > 5 else ""
    )


def _sample(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# --- manual controls -------------------------------------------------------------------------------


def act(session: Session, rollout_id: int, action: str, actor: str, now: dt.datetime | None = None) -> Rollout:
    """Carry out an operator action on a rollout (409 if its state does not allow it)."""
    if action not in MANUAL_ACTIONS:
        raise ConfigError(f"unknown rollout action {action!r} (known: {', '.join(MANUAL_ACTIONS)})")
    now = now or utcnow()
    rollout = get_rollout(session, rollout_id, lock=True)
    if action == "start":
        next_rollout_state(rollout.state, RolloutEvent.START, rollout.id)
        start_rollout(session, rollout, actor, now)
    elif action == "approve":
        approve(session, rollout, actor, now)
    elif action == "rollback":
        rollback(session, rollout, actor=actor, reason=f"rolled back by {actor}", record={}, now=now)
    elif action == "abort":
        change_state(session, rollout, RolloutEvent.ABORT, actor=actor, action="abort",
                     reason=f"aborted by {actor}; devices keep what they have", now=now)  # fmt: skip
        cancel_open_waves(session, rollout, now)
    else:
        event = RolloutEvent.PAUSE if action == "pause" else RolloutEvent.RESUME
        change_state(session, rollout, event, actor=actor, action=action, reason=f"{action}d by {actor}", now=now)
    return rollout


def approve(session: Session, rollout: Rollout, actor: str, now: dt.datetime) -> None:
    """Approve the next step; on a rollout paused by a gate, accept the current wave as passed."""
    previous = last_decision(session, rollout.id)
    override = rollout.state == RolloutState.PAUSED.value and previous is not None and previous.action in BREACH_ACTIONS
    reason = f"approved by {actor}"
    if override:
        assert previous is not None
        reason = f"approved by {actor} over the gate decision: {previous.reason}"
        wave = waves_of(session, rollout.id)[rollout.current_wave]
        set_wave_state(wave, WaveEvent.PASS, now)
        rollout.current_wave += 1
    change_state(session, rollout, RolloutEvent.APPROVE, actor=actor, action="approve", reason=reason, now=now)


def rollback(session: Session, rollout: Rollout, *, actor: str, reason: str, record: dict[str, Any],
             now: dt.datetime, failed_wave: RolloutWave | None = None) -> RolloutDecision:  # fmt: skip
    """Roll back: devices back to their previous tuple, open waves closed, decision stored."""
    next_rollout_state(rollout.state, RolloutEvent.ROLLBACK, rollout.id)
    if failed_wave is not None:
        set_wave_state(failed_wave, WaveEvent.FAIL, now)
    cancel_open_waves(session, rollout, now)
    restored = restore_devices(session, rollout, now)
    return change_state(session, rollout, RolloutEvent.ROLLBACK, actor=actor, action="rollback",
                        reason=reason, record={**record, "restore": restored}, now=now)  # fmt: skip


def restore_devices(session: Session, rollout: Rollout, now: dt.datetime) -> dict[str, Any]:
    """Direct every device this rollout released back to its previous tuple; a summary of what was done."""
    released = [d for d in devices_of(session, rollout.id) if d.membership == "member" and d.released_at is not None]
    ids = [d.device_id for d in released]
    current = assign.assignments_for(session, rollout.model_name, ids)
    caps: dict[str, Any] = dict(
        session.execute(select(Device.id, Device.capabilities).where(among(Device.id, ids))).tuples().all()
    )
    summary: dict[str, Any] = {"restored": 0, "cleared": 0, "skipped": []}
    manifests: dict[int, Any] = {}
    for device in released:
        row = current.get(device.device_id)
        if row is None or row.rollout_id != rollout.id:
            why = "its assignment changed since (pinned or reassigned)"
            summary["skipped"].append({"device_id": device.device_id, "reason": why})
            continue
        problem = _restore_one(session, rollout, device, row, caps.get(device.device_id), manifests, now)
        if problem:
            summary["skipped"].append({"device_id": device.device_id, "reason": problem})
        else:
            summary["cleared" if device.previous_version is None else "restored"] += 1
    return summary


def _restore_one(session: Session, rollout: Rollout, device: RolloutDevice, row: Assignment,
                 caps: dict[str, Any] | None, manifests: dict[int, Any], now: dt.datetime) -> str:  # fmt: skip
    """Restore one device; returns why it could not be restored (empty when it was)."""
    if device.previous_version is None:
        session.delete(row)
        device.restored_at = now
        return ""
    version = device.previous_version
    try:
        manifest = manifests.get(version) or load_manifest(session, rollout.model_name, version)
    except EdgeFleetError as error:
        return f"previous bundle cannot be checked: {error}"
    manifests[version] = manifest
    placement = place_on_capabilities(device.device_id, caps, manifest)
    if placement.membership != "member":
        return placement.reason
    known = {v.id for v in manifest.variants}
    row.bundle_version = version
    row.variant = device.previous_variant if device.previous_variant in known else placement.variant
    row.rollout_id = row.shadow_version = row.start_after = None
    row.pinned, row.updated_at = False, now
    device.restored_at = now
    return ""


# --- pins ------------------------------------------------------------------------------------------


def pin(session: Session, model: str, version: int, targets: Sequence[str], actor: str,
        now: dt.datetime | None = None) -> dict[str, Any]:  # fmt: skip
    """Pin devices to ``model@version``: rollouts leave them alone until unpinned."""
    now = now or utcnow()
    manifest = load_manifest(session, model, version, new_assignment=True)
    placements = place_devices(session, manifest, resolve_targets(session, targets), honour_pins=False)
    pinned = [p for p in placements if p.membership == "member"]
    writes = {p.device_id: {"bundle_version": version, "variant": p.variant, "rollout_id": None,
                            "shadow_version": None, "start_after": None, "pinned": True} for p in pinned}  # fmt: skip
    assign.upsert_assignments(session, model, writes, now)
    _leave_active_rollouts(session, model, [p.device_id for p in pinned], f"pinned to {model}@{version} by {actor}")
    out = {
        "pinned": [p.device_id for p in pinned],
        "not_pinned": [{"device_id": p.device_id, "reason": p.reason} for p in placements if p.membership != "member"],
    }
    audit.record(session, actor=actor, action="assignment.pin", target_type="model", target_id=f"{model}@{version}",
                 after={"targets": list(targets), **out})  # fmt: skip
    return out


def unpin(session: Session, model: str, targets: Sequence[str], actor: str) -> dict[str, Any]:
    """Lift pins of ``model`` on these devices (they keep their version until a rollout moves them)."""
    rows = assign.assignments_for(session, model, resolve_targets(session, targets))
    lifted = [device_id for device_id, row in rows.items() if row.pinned]
    for device_id in lifted:
        rows[device_id].pinned = False
        rows[device_id].updated_at = utcnow()
    audit.record(session, actor=actor, action="assignment.unpin", target_type="model", target_id=model,
                 after={"targets": list(targets), "unpinned": lifted})  # fmt: skip
    return {"unpinned": sorted(lifted)}


def _leave_active_rollouts(session: Session, model: str, device_ids: Sequence[str], reason: str) -> None:
    query = (
        select(RolloutDevice).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.model_name == model, Rollout.state.in_([s.value for s in ACTIVE_STATES]),
               RolloutDevice.membership == "member", among(RolloutDevice.device_id, device_ids))
    )  # fmt: skip
    for device in session.scalars(query):
        device.membership, device.reason = "pinned", reason
