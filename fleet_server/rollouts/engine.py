"""The evaluation loop: every few seconds, each running rollout is looked at once and moved on.

A tick, per running rollout, in one transaction with the rollout row locked (``SKIP LOCKED`` on
PostgreSQL, so several server processes can run the loop without doing the same work twice):

1. start the current wave if it is pending (promoting the devices of a passed shadow wave into it);
2. release devices of the wave under the download cap: write their assignment (live, or shadow) with
   a start-after time carrying their own jitter;
3. observe the released devices (:mod:`.observe`) and classify them (:func:`.decisions.classify_device`);
4. read the wave's telemetry and the control cohort's (devices of the rollout still on the previous
   version) from ``fleet_server.telemetry.query.cohort_stats`` and evaluate the gates;
5. decide (:func:`.decisions.decide`) and apply: advance to the next wave (and go round again),
   pause for approval, pause on a breach, complete, or roll back.

Ticks are idempotent: everything is recomputed from stored rows and the clock, a ``wait`` changes
only the stored evaluation, and every state change goes through the transition tables. A restart
loses nothing because nothing is kept in memory between ticks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.db import utcnow
from fleet_server.rollouts import assign, cohorts
from fleet_server.rollouts.decisions import (
    SETTLED,
    Action,
    Decision,
    DeviceOutcome,
    WaveProgress,
    classify_device,
    decide,
)
from fleet_server.rollouts.gates import CohortFigures, Gate, evaluate_gate, parse_gates
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.observe import observe_devices
from fleet_server.rollouts.service import (
    ENGINE_ACTOR,
    add_decision,
    change_state,
    devices_of,
    policy_of,
    rollback,
    set_wave_state,
    waves_of,
)
from fleet_server.rollouts.spec import RolloutPolicy
from fleet_server.rollouts.states import RolloutEvent, RolloutState, WaveEvent, WaveState
from fleet_server.telemetry.query import cohort_stats

log = logging.getLogger("fleet_server.rollouts.engine")

StatsFn = Callable[[Session, str, int, Sequence[str], dt.datetime], Any]
DEFAULT_TICK_S = 10.0
STICKY = frozenset({DeviceOutcome.FAILED.value, DeviceOutcome.TIMED_OUT.value})


class RolloutEngine:
    """Runs ticks over every running rollout; ``clock`` and ``stats`` are injectable for tests."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        clock: Callable[[], dt.datetime] = utcnow,
        stats: StatsFn = cohort_stats,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.stats = stats

    def tick(self) -> list[RolloutDecision]:
        """Evaluate every running rollout once; the decisions that acted."""
        with self.session_factory() as session:
            ids = list(session.scalars(select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value)))
        made: list[RolloutDecision] = []
        for rollout_id in ids:
            made.extend(self.tick_one(rollout_id))
        return made

    def tick_one(self, rollout_id: int) -> list[RolloutDecision]:
        """Evaluate one rollout in its own transaction (skipped if another process holds it)."""
        with self.session_factory() as session, session.begin():
            query = select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
            rollout = session.scalar(query)
            if rollout is None or rollout.state != RolloutState.RUNNING.value:
                return []
            return evaluate_rollout(session, rollout, self.clock(), self.stats)

    async def run(self, interval_s: float) -> None:
        """Tick forever (until cancelled), logging and surviving any error of a tick."""
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # a bad tick must not stop the loop; the next tick retries
                log.exception("rollout tick failed")
            await asyncio.sleep(interval_s)


def tick_interval_s(settings: Any) -> float:
    """The loop period: ``settings.rollout_tick_s`` if the settings have it, else EDGEFLEET_ROLLOUT_TICK_S."""
    value = getattr(settings, "rollout_tick_s", None) or os.environ.get("EDGEFLEET_ROLLOUT_TICK_S")
    return float(value) if value else DEFAULT_TICK_S


def evaluate_rollout(session: Session, rollout: Rollout, now: dt.datetime, stats: StatsFn) -> list[RolloutDecision]:
    """One tick of one running rollout (see the module docstring); returns the decisions that acted."""
    policy, gates = policy_of(rollout), parse_gates(list(policy_of(rollout).gates))
    waves = waves_of(session, rollout.id)
    made: list[RolloutDecision] = []
    for _ in range(len(waves) + 1):
        if rollout.state != RolloutState.RUNNING.value:
            break
        if rollout.current_wave >= len(waves):
            made.append(change_state(session, rollout, RolloutEvent.COMPLETE, actor=ENGINE_ACTOR, action="complete",
                                     reason="every wave passed", now=now))  # fmt: skip
            break
        wave = waves[rollout.current_wave]
        if wave.state == WaveState.PENDING.value:
            _start_wave(session, rollout, waves, wave, now)
        decision = evaluate_wave(session, rollout, policy, gates, wave, len(waves), now, stats)
        if not decision.acts:
            break
        made.append(_apply(session, rollout, wave, decision, now))
    rollout.evaluated_at = now
    return made


def _start_wave(
    session: Session, rollout: Rollout, waves: Sequence[RolloutWave], wave: RolloutWave, now: dt.datetime
) -> None:
    set_wave_state(wave, WaveEvent.START, now)
    previous = waves[wave.index - 1] if wave.index > 0 else None
    if previous is not None and previous.shadow and previous.state == WaveState.PASSED.value:
        for device in devices_of(session, rollout.id, previous.index):
            device.wave_index = wave.index
            device.released_at = device.start_after = device.running_since = device.outcome_at = None
            device.outcome, device.outcome_reason = None, "promoted from the shadow wave"


def evaluate_wave(
    session: Session,
    rollout: Rollout,
    policy: RolloutPolicy,
    gates: Sequence[Gate],
    wave: RolloutWave,
    wave_count: int,
    now: dt.datetime,
    stats: StatsFn,
) -> Decision:
    """Release, observe, classify, measure and decide for the rollout's current wave."""
    members = devices_of(session, rollout.id, wave.index)
    _classify(session, rollout, policy, wave, members, now)  # first, so settled devices free download slots
    _release(session, rollout, policy, wave, members, now)
    outcomes = Counter(DeviceOutcome(m.outcome or DeviceOutcome.WAITING.value) for m in members)
    if wave.state == WaveState.RUNNING.value and members and not _unreleased_or_installing(outcomes):
        set_wave_state(wave, WaveEvent.SETTLED, now)
    canary = _canary_figures(session, rollout, wave, members, outcomes, stats)
    control = _control_figures(session, rollout, wave, stats)
    results = [evaluate_gate(g, canary, control) for g in gates]
    deadline_passed = wave.deadline_at is not None and now >= wave.deadline_at and not outcomes[DeviceOutcome.WAITING]
    progress = WaveProgress(wave.index, wave.index == wave_count - 1, outcomes, deadline_passed)
    decision = decide(progress, results, policy)
    wave.evaluation = {
        "at": now.isoformat(), "action": decision.action.value, "reason": decision.reason,
        "devices": progress.counts(), "gates": [r.to_dict() for r in results],
        "canary": _figures_dict(canary), "control": _figures_dict(control) if control else None,
    }  # fmt: skip
    return decision


def _unreleased_or_installing(outcomes: Counter[DeviceOutcome]) -> bool:
    return bool(outcomes[DeviceOutcome.WAITING] or outcomes[DeviceOutcome.INSTALLING])


def _release(
    session: Session,
    rollout: Rollout,
    policy: RolloutPolicy,
    wave: RolloutWave,
    members: Sequence[RolloutDevice],
    now: dt.datetime,
) -> None:
    """Tell more devices of the wave to download, within the concurrency cap, in cohort order."""
    waiting = [m for m in members if m.released_at is None]
    in_flight = sum(
        1 for m in members if m.released_at is not None and m.outcome in (None, DeviceOutcome.INSTALLING.value)
    )
    quota = cohorts.release_quota(in_flight, len(waiting), policy.max_concurrent_downloads)
    order = cohorts.order_devices([m.device_id for m in waiting], rollout.id)[:quota]
    by_id = {m.device_id: m for m in waiting}
    writes = {device_id: _release_one(rollout, policy, wave, by_id[device_id], now) for device_id in order}
    assign.upsert_assignments(session, rollout.model_name, writes, now)
    if order:
        soak_and_timeout = dt.timedelta(seconds=policy.soak_s + policy.device_timeout_s)
        latest_start = max(m.start_after for m in members if m.start_after is not None)
        wave.deadline_at = latest_start + soak_and_timeout


def _release_one(
    rollout: Rollout, policy: RolloutPolicy, wave: RolloutWave, device: RolloutDevice, now: dt.datetime
) -> dict[str, Any]:
    """Mark one device released; the assignment values that direct it (live, or shadow beside its active)."""
    device.released_at = now
    device.start_after = cohorts.start_after(device.device_id, rollout.id, now, policy.jitter_s)
    device.outcome, device.outcome_reason = DeviceOutcome.INSTALLING.value, "told to install"
    values: dict[str, Any] = {"bundle_version": rollout.bundle_version, "variant": device.variant,
                              "shadow_version": None}  # fmt: skip
    if _is_shadow(wave, device):
        values = {"bundle_version": device.previous_version, "variant": device.previous_variant,
                  "shadow_version": rollout.bundle_version}  # fmt: skip
    return {**values, "rollout_id": rollout.id, "start_after": device.start_after, "pinned": False}


def _is_shadow(wave: RolloutWave, device: RolloutDevice) -> bool:
    return wave.shadow and device.previous_version is not None


def _classify(
    session: Session,
    rollout: Rollout,
    policy: RolloutPolicy,
    wave: RolloutWave,
    members: Sequence[RolloutDevice],
    now: dt.datetime,
) -> None:
    """Update each released device's outcome from what it reported (failures and timeouts stick)."""
    released = [m for m in members if m.start_after is not None and m.outcome not in STICKY]
    for shadow in (False, True):
        group = {m.device_id: m for m in released if _is_shadow(wave, m) is shadow}
        starts = {d: m.start_after for d, m in group.items() if m.start_after is not None}
        known = {d: m.running_since for d, m in group.items()}
        observations = observe_devices(session, rollout.model_name, rollout.bundle_version, starts, shadow, known)
        for device_id, obs in observations.items():
            outcome, reason = classify_device(obs, policy.soak_s, policy.device_timeout_s, now)
            device = group[device_id]
            if device.outcome != outcome.value:
                device.outcome, device.outcome_at = outcome.value, now
            device.outcome_reason, device.running_since = reason, obs.running_since


def _canary_figures(
    session: Session,
    rollout: Rollout,
    wave: RolloutWave,
    members: Sequence[RolloutDevice],
    outcomes: Counter[DeviceOutcome],
    stats: StatsFn,
) -> CohortFigures:
    counts = {
        "devices_total": len(members),
        "devices_healthy": outcomes[DeviceOutcome.HEALTHY],
        "devices_failed": outcomes[DeviceOutcome.FAILED],
        "devices_timed_out": outcomes[DeviceOutcome.TIMED_OUT],
    }
    released = [m for m in members if m.released_at is not None]
    if not released or wave.started_at is None:
        return CohortFigures(**counts)
    shadow = [m for m in released if _is_shadow(wave, m)]
    if shadow:  # shadow results ride in the windows of the version the device still serves
        version = Counter(m.previous_version for m in shadow).most_common(1)[0][0]
        cohort = stats(session, rollout.model_name, int(version or 0), [m.device_id for m in shadow], wave.started_at)
    else:
        cohort = stats(session, rollout.model_name, rollout.bundle_version, [m.device_id for m in released],
                       wave.started_at)  # fmt: skip
    return CohortFigures.from_stats(cohort, **counts)


def _control_figures(session: Session, rollout: Rollout, wave: RolloutWave, stats: StatsFn) -> CohortFigures | None:
    """The devices of this rollout not yet released, on their (most common) previous version."""
    if wave.started_at is None:
        return None
    query = select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id, RolloutDevice.membership == "member",
        RolloutDevice.released_at.is_(None), RolloutDevice.previous_version.is_not(None),
    )  # fmt: skip
    control = list(session.scalars(query))
    if not control:
        return None
    version = Counter(m.previous_version for m in control).most_common(1)[0][0]
    ids = [m.device_id for m in control if m.previous_version == version]
    return CohortFigures.from_stats(stats(session, rollout.model_name, int(version or 0), ids, wave.started_at))


def _figures_dict(figures: CohortFigures) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(figures, k) for k in figures.__dataclass_fields__}
    out["error_rate"], out["fallback_rate"] = figures.value("error_rate"), figures.value("fallback_rate")
    return out


def _apply(
    session: Session, rollout: Rollout, wave: RolloutWave, decision: Decision, now: dt.datetime
) -> RolloutDecision:
    """Carry out an acting decision and return its stored record."""
    record = decision.to_dict()
    action = decision.action
    if action is Action.ROLLBACK:
        return rollback(session, rollout, actor=ENGINE_ACTOR, reason=decision.reason, record=record, now=now,
                        failed_wave=wave)  # fmt: skip
    if action in (Action.PAUSE_ON_BREACH, Action.PAUSE_NO_DATA):
        return change_state(session, rollout, RolloutEvent.BREACH, actor=ENGINE_ACTOR, action=action.value,
                            reason=decision.reason, record=record, now=now)  # fmt: skip
    set_wave_state(wave, WaveEvent.PASS, now)
    rollout.current_wave += 1
    if action is Action.ADVANCE:
        return add_decision(session, rollout, actor=ENGINE_ACTOR, action=action.value, reason=decision.reason,
                            record=record, now=now)  # fmt: skip
    event = RolloutEvent.COMPLETE if action is Action.COMPLETE else RolloutEvent.WAVE_NEEDS_APPROVAL
    return change_state(session, rollout, event, actor=ENGINE_ACTOR, action=action.value, reason=decision.reason,
                        record=record, now=now)  # fmt: skip


__all__ = ["SETTLED", "RolloutEngine", "evaluate_rollout", "tick_interval_s"]
