"""The evaluation loop: every few seconds, new telemetry is folded in and each running rollout moved on.

A tick first folds the telemetry that arrived since the last one into the rollups and device
evidence (:mod:`.fold`: each row once, in short transactions). Then, per running rollout, in its own
transaction with the rollout row locked (``SKIP LOCKED`` on PostgreSQL; on SQLite the background
loop runs in one process, see ``fleet_server.locks``):

1. start the current wave if it is pending (promoting the devices of a passed shadow wave into it);
2. classify the released devices whose outcome can have changed from their evidence (:mod:`.members`
   says which; :mod:`.observe`, :func:`.decisions.classify_device`);
3. release devices of the wave under the download cap: write their assignment (live, or shadow) with
   a start-after time carrying their own jitter;
4. count the wave's devices (:func:`.members.wave_tally`), read the wave's figures and the control
   cohort's (members still on their previous version) from the rollups, each device counted at most as
   twice the median device (:mod:`.weights`), and evaluate the gates;
5. decide (:func:`.decisions.decide`) and apply: advance to the next wave (and go round again),
   pause for approval, pause on a breach, complete, or roll back.

Each rollout is evaluated in isolation: if its evaluation raises, the error is logged, counted
(``edgefleet_rollout_evaluation_failures_total``) and recorded as a ``pause_on_error`` decision
("evaluation failed: ..."), the rollout pauses itself, and the other rollouts are evaluated as usual.
A database that is unavailable is not the rollout's fault: that tick is skipped and retried.

Ticks are idempotent: a tick reads stored rows and the clock, a ``wait`` changes only the stored
evaluation, and every state change goes through the transition tables. A restart loses nothing
because nothing is kept in memory between ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.db import among, utcnow
from fleet_server.locks import serialized
from fleet_server.models import Device
from fleet_server.rollouts import assign, cohorts, weights
from fleet_server.rollouts.decisions import (
    SETTLED,
    Action,
    Decision,
    DeviceOutcome,
    WaveProgress,
    classify_device,
    decide,
)
from fleet_server.rollouts.fold import CONTROL, ENGINE_LOCK, WAVE, FoldReport, fold_pending, variant_cohort
from fleet_server.rollouts.gates import CohortFigures, Gate, evaluate_gate, evaluate_per_variant, parse_gates
from fleet_server.rollouts.members import (
    Member,
    Tally,
    members_to_visit,
    shadow_versions,
    wave_tally,
    write_changes,
)
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutRollup, RolloutWave
from fleet_server.rollouts.observe import observation_of
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
from fleet_server.telemetry.query import baseline_of, stats_of

log = logging.getLogger("fleet_server.rollouts.engine")

STICKY = frozenset({DeviceOutcome.FAILED.value, DeviceOutcome.TIMED_OUT.value})
ERROR_ACTION = "pause_on_error"
TRANSIENT_ERRORS = (OperationalError,)
"""Errors of the database, not of the rollout: the tick is retried, nothing is paused."""


class RolloutEngine:
    """Runs ticks over every running rollout; ``clock`` is injectable for tests, ``metrics`` (the app's
    :class:`fleet_server.observability.Metrics`) optional."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        clock: Callable[[], dt.datetime] = utcnow,
        metrics: Any = None,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.metrics = metrics
        self.is_leader = is_leader

    def tick(self) -> list[RolloutDecision]:
        """Fold new telemetry, then evaluate every running rollout once; the decisions that acted."""
        started = time.perf_counter()
        with collector_paused():
            self.fold()
            with self.session_factory() as session:
                ids = list(session.scalars(select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value)))
            made: list[RolloutDecision] = []
            for rollout_id in ids:
                made.extend(self._evaluate_isolated(rollout_id))
        if self.metrics is not None:
            self.metrics.rollout_tick_s.observe(time.perf_counter() - started)
        return made

    def fold(self) -> FoldReport:
        """Fold the telemetry that arrived since the last fold (see :mod:`.fold`)."""
        report = fold_pending(self.session_factory)
        if self.metrics is not None and report.invalid_windows:
            self.metrics.invalid_windows.inc(report.invalid_windows)
        if self.metrics is not None and report.invalid_events:
            self.metrics.invalid_events.inc(report.invalid_events)
        return report

    def tick_guarded(self) -> list[RolloutDecision]:
        """:meth:`tick`, with any error logged and counted (``edgefleet_rollout_tick_failures_total``) instead of
        raised: the loop's next tick retries, and an operator sees a stalled engine in the metrics, not only in
        the logs."""
        try:
            return self.tick()
        except Exception:
            log.exception("rollout tick failed")
            if self.metrics is not None:
                self.metrics.rollout_tick_failures.inc()
            return []

    def tick_one(self, rollout_id: int) -> list[RolloutDecision]:
        """Fold new telemetry and evaluate one rollout now (an operator's ``evaluate``)."""
        self.fold()
        return self._evaluate_isolated(rollout_id)

    def _evaluate_isolated(self, rollout_id: int) -> list[RolloutDecision]:
        """Evaluate one rollout; if that raises, record the failure and pause it (see the module docstring)."""
        try:
            made = self._evaluate(rollout_id)
        except TRANSIENT_ERRORS:
            log.warning("rollout %s not evaluated: the database is unavailable; retrying at the next tick", rollout_id)
            return []
        except Exception as error:  # isolation: one rollout's failure must not stop the others
            return self._contain(rollout_id, error)
        if self.metrics is not None:
            for decision in made:
                self.metrics.rollout_decisions.labels(decision.action).inc()
        return made

    def _evaluate(self, rollout_id: int) -> list[RolloutDecision]:
        with self.session_factory() as session, serialized(session, ENGINE_LOCK):
            query = select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
            rollout = session.scalar(query)
            if rollout is None or rollout.state != RolloutState.RUNNING.value:
                session.rollback()
                return []
            made = evaluate_rollout(session, rollout, self.clock())
            session.commit()
            return made

    def _contain(self, rollout_id: int, error: Exception) -> list[RolloutDecision]:
        """Record a failed evaluation as a decision and pause the rollout (if it still runs)."""
        log.error("evaluating rollout %s failed; pausing it", rollout_id, exc_info=error)
        if self.metrics is not None:
            self.metrics.rollout_evaluation_failures.inc()
        reason = f"evaluation failed: {type(error).__name__}: {error}"[:1000]
        try:
            with self.session_factory() as session, session.begin():
                rollout = session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())
                if rollout is None or rollout.state != RolloutState.RUNNING.value:
                    return []
                record = {"error": type(error).__name__}
                decision = change_state(session, rollout, RolloutEvent.BREACH, actor=ENGINE_ACTOR, action=ERROR_ACTION,
                                        reason=reason, record=record, now=self.clock())  # fmt: skip
        except (DBAPIError, OperationalError):
            log.exception("could not record the failed evaluation of rollout %s", rollout_id)
            return []
        if self.metrics is not None:
            self.metrics.rollout_decisions.labels(ERROR_ACTION).inc()
        return [decision]

    async def run(self, interval_s: float) -> None:
        """Tick forever (until cancelled) while this process is the background leader, surviving any error."""
        while True:
            try:
                if await asyncio.to_thread(self.is_leader):
                    await asyncio.to_thread(self.tick_guarded)
            except Exception:  # a failed leadership check must not stop the loop either
                log.exception("rollout tick failed")
            await asyncio.sleep(interval_s)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with Python's cyclic garbage collector paused (it resumes afterwards).

    A tick at 10,000 devices allocates some 60,000 containers (parsed windows, evidence, rows) that
    live until its end: with the collector running, they survive young collections into the old
    generation and set off full collections of the whole process heap, which took a fifth of a
    tick's CPU time. Paused, they are freed by reference counting when the tick drops them, and the
    little cyclic garbage a tick leaves (sessions) is collected by the next collection after it.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def evaluate_rollout(session: Session, rollout: Rollout, now: dt.datetime) -> list[RolloutDecision]:
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
        decision = evaluate_wave(session, rollout, policy, gates, wave, len(waves), now)
        if not decision.acts:
            break
        made.append(_apply(session, rollout, wave, decision, now))
    rollout.evaluated_at = now
    rollout.evaluations += 1  # evidence the fold changes from now on is stamped for the next evaluation
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
            device.evidence = device.last_report_at = device.last_on_target_at = device.left_target_at = None
            device.failure = None
            device.outcome, device.outcome_reason = None, "promoted from the shadow wave"


def evaluate_wave(
    session: Session,
    rollout: Rollout,
    policy: RolloutPolicy,
    gates: Sequence[Gate],
    wave: RolloutWave,
    wave_count: int,
    now: dt.datetime,
) -> Decision:
    """Classify, release, measure and decide for the rollout's current wave (counting its devices in SQL, loading
    only those the tick may change: :mod:`.members`)."""
    tally = wave_tally(session, rollout.id, wave.index)
    members = members_to_visit(session, rollout.id, wave.index, rollout.evaluations, _timeout_before(policy, now))
    with session.no_autoflush:  # on SQLite, writes (and its write lock) wait for the end of the tick
        before = [m.key() for m in members]
        _classify(session, policy, wave, members, now)  # first, so settled devices free download slots
        tally.moved(before, members)
        before = [m.key() for m in members]
        released = _release(session, rollout, policy, wave, members, tally, now)
        tally.moved(before, members)
        outcomes = tally.outcomes()
        if wave.state == WaveState.RUNNING.value and tally.total() and not _unreleased_or_installing(outcomes):
            set_wave_state(wave, WaveEvent.SETTLED, now)
        control = _control_figures(session, rollout, wave, released, any(g.relative for g in gates))
        canary = _canary_figures(session, rollout, wave, tally, released)
        by_variant = _variant_figures(session, rollout, wave, tally, canary)
    write_changes(session, rollout.id, members)
    results = [evaluate_per_variant(g, by_variant, control) if g.per_variant else evaluate_gate(g, canary, control)
               for g in gates]  # fmt: skip
    deadline_passed = wave.deadline_at is not None and now >= wave.deadline_at and not outcomes[DeviceOutcome.WAITING]
    progress = WaveProgress(wave.index, wave.index == wave_count - 1, outcomes, deadline_passed)
    decision = decide(progress, results, policy)
    wave.evaluation = {
        "at": now.isoformat(), "action": decision.action.value, "reason": decision.reason,
        "devices": progress.counts(), "gates": [r.to_dict() for r in results],
        "canary": _figures_dict(canary), "control": _figures_dict(control) if control else None,
        "by_variant": {variant: _figures_dict(figures) for variant, figures in by_variant.items()},
    }  # fmt: skip
    return decision


def _unreleased_or_installing(outcomes: Counter[DeviceOutcome]) -> bool:
    return bool(outcomes[DeviceOutcome.WAITING] or outcomes[DeviceOutcome.INSTALLING])


def _timeout_before(policy: RolloutPolicy, now: dt.datetime) -> dt.datetime:
    """The start-after time before which a device's timeout has come (:func:`.decisions.classify_device`)."""
    try:
        return now - dt.timedelta(seconds=policy.soak_s) - dt.timedelta(seconds=policy.device_timeout_s)
    except OverflowError:  # no device can have started that long ago
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _release(
    session: Session,
    rollout: Rollout,
    policy: RolloutPolicy,
    wave: RolloutWave,
    members: Sequence[Member],
    tally: Tally,
    now: dt.datetime,
) -> list[Member]:
    """Tell more devices of the wave to download, within the concurrency cap, in cohort order; returns them.

    ``members`` holds every device of the wave not released yet; ``tally`` counts the wave's devices."""
    waiting = [m for m in members if m.released_at is None]
    quota = cohorts.release_quota(tally.in_flight(), len(waiting), policy.max_concurrent_downloads)
    order = cohorts.order_devices([m.device_id for m in waiting], rollout.id)[:quota]
    by_id = {m.device_id: m for m in waiting}
    writes = {device_id: _release_one(rollout, policy, wave, by_id[device_id], now) for device_id in order}
    assign.upsert_assignments(session, rollout.model_name, writes, now)
    released = [by_id[device_id] for device_id in order]
    if released:
        soak_and_timeout = dt.timedelta(seconds=policy.soak_s + policy.device_timeout_s)
        starts = [m.start_after for m in released if m.start_after is not None]
        wave.deadline_at = max([*starts, *([tally.latest_start] if tally.latest_start else [])]) + soak_and_timeout
    return released


def _release_one(
    rollout: Rollout, policy: RolloutPolicy, wave: RolloutWave, device: Member, now: dt.datetime
) -> dict[str, Any]:
    """Mark one device released; the assignment values that direct it (live, or shadow beside its active)."""
    start_after = cohorts.start_after(device.device_id, rollout.id, now, policy.jitter_s)
    device.clear_evidence()  # what it reported as a control device is not evidence of the new bundle
    device.set(released_at=now, start_after=start_after, outcome=DeviceOutcome.INSTALLING.value,
               outcome_reason="told to install")  # fmt: skip
    device.changed["evidence_seq"] = rollout.evaluations + 1  # the next evaluation classifies it
    values: dict[str, Any] = {"bundle_version": rollout.bundle_version, "variant": device.variant,
                              "shadow_version": None}  # fmt: skip
    if _is_shadow(wave, device):
        values = {"bundle_version": device.previous_version, "variant": device.previous_variant,
                  "shadow_version": rollout.bundle_version}  # fmt: skip
    return {**values, "rollout_id": rollout.id, "start_after": device.start_after, "pinned": False}


def _is_shadow(wave: RolloutWave, device: Member | RolloutDevice) -> bool:
    return wave.shadow and device.previous_version is not None


def _classify(
    session: Session,
    policy: RolloutPolicy,
    wave: RolloutWave,
    members: Sequence[Member],
    now: dt.datetime,
) -> None:
    """Update each released device's outcome from its evidence (failures and timeouts stick)."""
    released = [m for m in members if m.start_after is not None and m.outcome not in STICKY]
    polled = _last_polls(session, [m.device_id for m in released if m.last_report_at is None])
    for device in released:
        assert device.start_after is not None
        obs = observation_of(device.device_id, device.start_after, polled.get(device.device_id),
                             _is_shadow(wave, device), running_since=device.running_since,
                             last_report_at=device.last_report_at, last_on_target_at=device.last_on_target_at,
                             left_target_at=device.left_target_at, failure=device.failure)  # fmt: skip
        outcome, reason = classify_device(obs, policy.soak_s, policy.device_timeout_s, now)
        if device.outcome != outcome.value:
            device.set(outcome=outcome.value, outcome_at=now)
        device.set(outcome_reason=reason)


def _last_polls(session: Session, device_ids: list[str]) -> dict[str, dt.datetime | None]:
    """When each device last polled its desired state (what a device that sent nothing still shows)."""
    if not device_ids:
        return {}
    rows = session.execute(select(Device.id, Device.last_seen_at).where(among(Device.id, device_ids)))
    return dict(rows.tuples().all())


def _device_counts(tally: Tally) -> dict[str, int]:
    outcomes = tally.outcomes()
    return {"devices_total": tally.total(), "devices_healthy": outcomes[DeviceOutcome.HEALTHY],
            "devices_failed": outcomes[DeviceOutcome.FAILED],
            "devices_timed_out": outcomes[DeviceOutcome.TIMED_OUT]}  # fmt: skip


def _canary_figures(
    session: Session, rollout: Rollout, wave: RolloutWave, tally: Tally, released: Sequence[Member]
) -> CohortFigures:
    """The wave's figures (``released``: its devices released by this tick, not written yet)."""
    counts = _device_counts(tally)
    if not tally.released() or wave.started_at is None:
        return CohortFigures(**counts)
    version = rollout.bundle_version
    if wave.shadow and tally.released(with_previous=True):  # shadow results ride in the windows of the version
        versions = shadow_versions(session, rollout.id, wave.index, released)  # the device still serves
        version = int(next(iter(versions), 0) or 0)
    return _rollup_figures(session, rollout, (rollout.id, wave.index, WAVE, version), counts)


def _variant_figures(
    session: Session, rollout: Rollout, wave: RolloutWave, tally: Tally, canary: CohortFigures
) -> dict[str, CohortFigures]:
    """The wave's figures per variant the server directed its devices to (from per-variant rollups, when several).

    A shadow wave's devices keep serving their previous version beside the target: its figures stay whole.
    """
    groups = tally.by_variant()
    if len(groups) <= 1 or (wave.shadow and tally.released(with_previous=True)):
        return dict.fromkeys(groups, canary)
    out = {}
    for variant, group in groups.items():
        counts = _device_counts(group)
        if wave.started_at is None or not group.released():
            out[variant] = CohortFigures(**counts)
            continue
        key = (rollout.id, wave.index, variant_cohort(variant), rollout.bundle_version)
        out[variant] = _rollup_figures(session, rollout, key, counts, variant)
    return out


def _control_figures(
    session: Session, rollout: Rollout, wave: RolloutWave, released: Sequence[Member], relative: bool
) -> CohortFigures | None:
    """The rollout's members not released yet, on their (most common) previous version, since the wave started
    (``released``: the current wave's devices released by this tick, not written yet). Each device is counted at a
    bounded weight when a gate is ``relative`` to these figures; otherwise they are context, pooled (the fold keeps
    no shares of the control for such a rollout)."""
    if wave.started_at is None:
        return None
    query = (
        select(RolloutDevice.previous_version, func.count())
        .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.membership == "member",
               RolloutDevice.released_at.is_(None), RolloutDevice.previous_version.is_not(None))
        .group_by(RolloutDevice.previous_version)
    )  # fmt: skip
    counts = Counter(dict(session.execute(query).tuples().all()))
    counts.subtract(m.previous_version for m in released if m.previous_version is not None)
    counts = +counts  # drop the versions no unreleased member runs any more
    if not counts:
        return None
    version = max(sorted(v for v in counts if v is not None), key=lambda v: counts[v])
    key = (rollout.id, wave.index, CONTROL, int(version or 0))
    return _rollup_figures(session, rollout, key, {}, bounded=relative)


def _rollup_figures(
    session: Session,
    rollout: Rollout,
    key: weights.ShareKey,
    counts: dict[str, int],
    variant: str | None = None,
    bounded: bool = True,
) -> CohortFigures:
    """A cohort's figures from its rollup (empty before its first window), each device counted at most as twice
    the median device (:mod:`.weights`; ``variant``: the key is a variant cohort, whose devices' shares are their
    wave's)."""
    row = session.scalar(select(RolloutRollup).where(
        RolloutRollup.rollout_id == key[0], RolloutRollup.wave_index == key[1],
        RolloutRollup.cohort == key[2], RolloutRollup.bundle_version == key[3]))  # fmt: skip
    if row is None:
        stats = stats_of({}, {}, 0)
        return CohortFigures.from_stats(stats, **counts)
    share_key = key if variant is None else (key[0], key[1], WAVE, key[3])
    bound = weights.bound_of(session, share_key, variant) if bounded else weights.Bound()
    merged = weights.bounded(session, share_key, row.merged or {}, bound.weights)
    stats = stats_of(merged, baseline_of(session, rollout.model_name, key[3]), row.devices)
    extra: dict[str, Any] = {"invalid_windows": row.invalid_windows, "request_cap": bound.caps.get("requests")}
    if bound.weights:
        extra |= {**weights.weighted_counts(merged), "bounded_devices": len(bound.weights)}
    return replace(CohortFigures.from_stats(stats, **counts), **extra)


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


__all__ = ["SETTLED", "RolloutEngine", "evaluate_rollout"]
