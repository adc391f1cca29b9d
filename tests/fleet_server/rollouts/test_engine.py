"""The engine on a real database (SQLite and PostgreSQL): waves, gates, rollbacks, timeouts, controls."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import select

from bundles.errors import ConfigError
from fleet_server.db import session_scope
from fleet_server.errors import ConflictError
from fleet_server.models import Assignment, AuditEntry
from fleet_server.rollouts import service
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.states import RolloutStateError
from tests.fleet_server.rollouts.conftest import SOAK_S, TIMEOUT_S
from tests.fleet_server.rollouts.fleetsim import T0

Behaviour = Callable[[str, dt.datetime], None]


def state(factory, rollout_id):
    with factory() as session:
        rollout = session.get(Rollout, rollout_id)
        waves = list(
            session.scalars(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id).order_by(RolloutWave.index))
        )
        decisions = list(
            session.scalars(
                select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id).order_by(RolloutDecision.id)
            )
        )
        devices = {
            d.device_id: d for d in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        }
        return rollout, waves, decisions, devices


def released(factory, rollout_id):
    with factory() as session:
        query = select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout_id, RolloutDevice.released_at.is_not(None)
        )
        return {d.device_id: d.start_after for d in session.scalars(query)}


def drive(engine, factory, clock, rollout_id, behave: Behaviour, max_steps=12, step_s=SOAK_S + 2):
    """Tick; let newly released devices behave; let time pass; until the rollout stops running."""
    done: set[str] = set()
    for _ in range(max_steps):
        engine.tick()
        for device_id, start in released(factory, rollout_id).items():
            if device_id not in done:
                behave(device_id, start)
                done.add(device_id)
        engine.tick()
        if state(factory, rollout_id)[0].state != "running":
            return
        clock.advance(step_s)


def actions(decisions):
    return [d.action for d in decisions]


def test_good_bundle_advances_through_every_wave_and_completes(fleet, factory, engine, clock, create):
    ids = fleet.add_devices(20)
    rollout_id = create()
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S))
    rollout, waves, decisions, devices = state(factory, rollout_id)
    assert rollout.state == "completed"
    assert actions(decisions) == ["create", "start", "advance", "advance", "complete"]
    assert [w.state for w in waves] == ["passed"] * 3 and [w.planned_devices for w in waves] == [1, 9, 10]
    assert all(devices[d].outcome == "healthy" for d in ids)
    assert {(a.bundle_version, a.rollout_id) for a in map(fleet.assignment, ids)} == {(2, rollout_id)}
    first = decisions[2].record
    assert first["devices"]["healthy"] == 1 and [g["status"] for g in first["gates"]] == ["pass", "pass"]


@pytest.mark.parametrize(
    ("gate", "window", "named"),
    [
        ("error_rate<0.01 min=50", {"errors": 10}, "error_rate=0.05 breached <0.01 over 200 requests"),
        ("p99_ms<40 min=50", {"latency_ms": 80.0}, "p99_ms="),
        ("psi<0.2 min=50", {"drift": True}, "psi="),
        ("psi_output<0.2 min=50", {"drift": True}, "psi_output="),
        ("fallback_rate<0.05 min=50", {"fallbacks": 40}, "fallback_rate=0.2 breached"),
    ],
)
def test_bad_bundle_stops_at_the_first_wave_and_is_rolled_back(
    fleet, factory, engine, clock, create, gate, window, named
):
    ids = fleet.add_devices(20)
    rollout_id = create(gates=(gate,))
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S, **window))
    rollout, waves, decisions, devices = state(factory, rollout_id)
    assert rollout.state == "rolled_back"
    assert [w.state for w in waves] == ["failed", "cancelled", "cancelled"]
    rollback = decisions[-1]
    assert rollback.action == "rollback" and rollback.actor == "engine" and rollback.wave_index == 0
    assert named in rollback.reason
    failed_gate = next(g for g in rollback.record["gates"] if g["status"] == "fail")
    assert failed_gate["gate"] == gate and failed_gate["sample"] == 200 and failed_gate["value"] is not None
    canary = [d for d in ids if devices[d].released_at is not None]
    assert len(canary) == 1 and rollback.record["restore"]["restored"] == 1
    restored = fleet.assignment(canary[0])
    assert (restored.bundle_version, restored.variant, restored.rollout_id, restored.shadow_version) == (
        1,
        "onnx-fp32",
        None,
        None,
    )
    untouched = [fleet.assignment(d) for d in ids if d not in canary]
    assert {(a.bundle_version, a.rollout_id, a.updated_at) for a in untouched} == {(1, None, T0)}


def test_breach_acts_before_the_soak_ends(fleet, factory, engine, clock, create):
    fleet.add_devices(5)
    rollout_id = create()
    engine.tick()
    ((device_id, start),) = released(factory, rollout_id).items()
    fleet.install(device_id, 2, start)
    fleet.report(device_id, 2, start, 60, requests=100, errors=30)
    clock.advance(61)
    engine.tick()
    assert state(factory, rollout_id)[0].state == "rolled_back"


def test_silent_device_times_out_and_counts_as_a_failure(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    (device_id,) = released(factory, rollout_id)
    clock.advance(SOAK_S + TIMEOUT_S - 1)
    engine.tick()
    assert state(factory, rollout_id)[3][device_id].outcome == "installing"
    clock.advance(1)
    engine.tick()
    rollout, _, decisions, devices = state(factory, rollout_id)
    assert devices[device_id].outcome == "timed_out" and devices[device_id].outcome_reason == "never reported"
    assert rollout.state == "rolled_back"
    assert "install_success cannot reach >=0.95: 0 healthy, 0 failed, 1 timed out of 1 devices" in decisions[-1].reason


def test_device_that_installs_then_goes_silent_times_out(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    ((device_id, start),) = released(factory, rollout_id).items()
    fleet.install(device_id, 2, start)
    fleet.report(device_id, 2, start, 60, requests=100)
    clock.advance(SOAK_S + TIMEOUT_S)
    engine.tick()
    device = state(factory, rollout_id)[3][device_id]
    assert device.outcome == "timed_out" and device.outcome_reason.startswith("silent for 840 s running the new")


def test_reported_install_failure_rolls_back_at_once(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    ((device_id, start),) = released(factory, rollout_id).items()
    fleet.install(device_id, 2, start, result="rolled_back", reason="golden self-test failed")
    clock.advance(5)
    engine.tick()
    rollout, _, decisions, devices = state(factory, rollout_id)
    assert devices[device_id].outcome_reason == "install rolled back: golden self-test failed"
    assert rollout.state == "rolled_back" and "1 failed" in decisions[-1].reason


def test_device_that_falls_back_to_the_old_version_after_installing_fails(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    ((device_id, start),) = released(factory, rollout_id).items()
    fleet.install(device_id, 2, start)
    fleet.report(device_id, 2, start, 60, requests=100)
    fleet.report(device_id, 1, start + dt.timedelta(seconds=60), 600, requests=100)
    clock.advance(SOAK_S + 2)
    engine.tick()
    assert state(factory, rollout_id)[3][device_id].outcome == "failed"


def test_insufficient_data_waits_then_pauses_never_passes_and_approve_overrides(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create(gates=("error_rate<0.01 min=1000",))
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S), max_steps=1)
    rollout, waves, decisions, _ = state(factory, rollout_id)
    assert rollout.state == "running" and waves[0].state == "soaking"
    assert "waiting for data: error_rate<0.01 min=1000: needs 1000 requests, has 200" in waves[0].evaluation["reason"]
    clock.advance(TIMEOUT_S)
    engine.tick()
    rollout, waves, decisions, _ = state(factory, rollout_id)
    assert rollout.state == "paused" and decisions[-1].action == "pause_no_data"
    assert waves[0].state == "soaking"
    with session_scope(factory) as session:
        service.act(session, rollout_id, "approve", "key:1:alice", now=clock())
    rollout, waves, decisions, _ = state(factory, rollout_id)
    assert rollout.state == "running" and waves[0].state == "passed" and rollout.current_wave == 1
    assert decisions[-1].actor == "key:1:alice" and "over the gate decision: insufficient data" in decisions[-1].reason


def test_pause_on_breach_policy_pauses_and_resume_re_evaluates(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create(on_breach="pause")
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S, errors=50))
    rollout, _, decisions, _ = state(factory, rollout_id)
    assert rollout.state == "paused" and decisions[-1].action == "pause_on_breach"
    with session_scope(factory) as session:
        service.act(session, rollout_id, "resume", "key:1:alice", now=clock())
    engine.tick()
    assert actions(state(factory, rollout_id)[2])[-3:] == ["pause_on_breach", "resume", "pause_on_breach"]


def test_approval_before_each_wave(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create(approval="each_wave", waves="10%,100%")
    engine.tick()
    assert state(factory, rollout_id)[0].state == "awaiting_approval" and not released(factory, rollout_id)
    for expected_released, expected_state in ((2, "awaiting_approval"), (20, "completed")):
        with session_scope(factory) as session:
            service.act(session, rollout_id, "approve", "key:1:alice", now=clock())
        drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S))
        assert len(released(factory, rollout_id)) == expected_released
        assert state(factory, rollout_id)[0].state == expected_state


def test_ticks_are_idempotent(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    before = state(factory, rollout_id)
    rows_before = {a.device_id: a.updated_at for a in map(fleet.assignment, before[3])}
    for _ in range(3):
        engine.tick()
    after = state(factory, rollout_id)
    assert actions(after[2]) == actions(before[2])
    assert {a.device_id: a.updated_at for a in map(fleet.assignment, after[3])} == rows_before
    assert {d: (r.released_at, r.start_after) for d, r in after[3].items()} == {
        d: (r.released_at, r.start_after) for d, r in before[3].items()
    }


def test_download_cap_and_start_after_jitter(fleet, factory, engine, clock, create):
    fleet.add_devices(6)
    rollout_id = create(waves="100%", max_concurrent_downloads=2, jitter_s=120.0)
    engine.tick()
    first = released(factory, rollout_id)
    assert len(first) == 2
    assert all(clock() <= start < clock() + dt.timedelta(seconds=120) for start in first.values())
    assert {fleet.assignment(d).start_after for d in first} == set(first.values())
    clock.advance(10)
    engine.tick()
    assert len(released(factory, rollout_id)) == 2  # still downloading: no new slot
    fleet.install(next(iter(first)), 2, clock())
    clock.advance(10)
    engine.tick()
    assert len(released(factory, rollout_id)) == 3


def test_shadow_wave_installs_beside_the_active_model_then_promotes(fleet, factory, engine, clock, create):
    ids = fleet.add_devices(10)
    rollout_id = create(waves="1:shadow,1,100%", gates=("shadow_agreement>0.98 min=50",))
    engine.tick()
    ((device_id, start),) = released(factory, rollout_id).items()
    row = fleet.assignment(device_id)
    assert (row.bundle_version, row.shadow_version, row.rollout_id) == (1, 2, rollout_id)
    fleet.install(device_id, 2, start)
    fleet.report(device_id, 1, start, SOAK_S + 1, requests=200, shadow=(200, 199))
    clock.advance(SOAK_S + 2)
    engine.tick()
    rollout, waves, decisions, devices = state(factory, rollout_id)
    assert waves[0].state == "passed" and waves[0].evaluation["gates"][0]["value"] == pytest.approx(0.995)
    assert devices[device_id].wave_index == 1
    row = fleet.assignment(device_id)
    assert (row.bundle_version, row.shadow_version) == (2, None)
    assert len(ids) == 10


def test_conflicting_rollout_is_refused_with_the_holder_named(fleet, factory, engine, clock, create):
    fleet.add_devices(5)
    first = create()
    with pytest.raises(ConflictError, match=rf"5 device\(s\) .* are in rollout {first} of digits, which is running"):
        create()
    with session_scope(factory) as session:
        service.act(session, first, "abort", "key:1:alice", now=clock())
    assert create() != first


def test_incompatible_devices_are_listed_never_silently_skipped(fleet, factory, engine, clock, create):
    fleet.add_devices(4)
    odd = fleet.add_devices(2, caps={**fleet_caps(), "runtimes": {}}, version=None)
    rollout_id = create()
    _, waves, _, devices = state(factory, rollout_id)
    assert sum(w.planned_devices for w in waves) == 4
    for device_id in odd:
        assert devices[device_id].membership == "incompatible" and devices[device_id].wave_index is None
        assert "runtime onnxruntime is not installed" in devices[device_id].reason
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S))
    assert all(fleet.assignment(d) is None for d in odd)


def test_a_rollout_nobody_can_take_is_refused(fleet, factory, create):
    fleet.add_devices(2, caps={**fleet_caps(), "runtimes": {"onnxruntime": "1.10"}})
    with pytest.raises(ConfigError, match="no device of the target set can take digits@2: .*older than the required"):
        create()


def test_pinned_devices_stay_out_and_a_pin_during_a_rollout_takes_the_device_out(fleet, factory, engine, clock, create):
    ids = fleet.add_devices(10)
    with session_scope(factory) as session:
        assert service.pin(session, "digits", 1, [f"device:{ids[0]}"], "key:1:alice", now=clock())["pinned"] == [ids[0]]
    rollout_id = create(waves="100%")
    engine.tick()
    devices = state(factory, rollout_id)[3]
    assert devices[ids[0]].membership == "pinned" and ids[0] not in released(factory, rollout_id)
    with session_scope(factory) as session:
        service.pin(session, "digits", 1, [f"device:{ids[1]}"], "key:1:alice", now=clock())
    assert state(factory, rollout_id)[3][ids[1]].membership == "pinned"
    with session_scope(factory) as session:
        service.act(session, rollout_id, "rollback", "key:1:alice", now=clock())
    pinned = fleet.assignment(ids[1])
    assert pinned.pinned and pinned.bundle_version == 1 and pinned.rollout_id is None


def test_manual_rollback_after_completion_restores_every_device(fleet, factory, engine, clock, create):
    ids = fleet.add_devices(6)
    fresh = fleet.add_devices(1, version=None)
    rollout_id = create(waves="50%,100%")
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S))
    assert state(factory, rollout_id)[0].state == "completed"
    with session_scope(factory) as session:
        service.act(session, rollout_id, "rollback", "key:1:alice", now=clock())
    rollout, _, decisions, _ = state(factory, rollout_id)
    assert rollout.state == "rolled_back" and decisions[-1].record["restore"] == {
        "restored": 6,
        "cleared": 1,
        "skipped": [],
    }
    assert {fleet.assignment(d).bundle_version for d in ids} == {1}
    assert fleet.assignment(fresh[0]) is None
    with factory() as session:
        audit = [e.action for e in session.scalars(select(AuditEntry).where(AuditEntry.target_type == "rollout"))]
    assert audit[0] == "rollout.create" and audit[-1] == "rollout.rollback"


def test_controls_refused_in_the_wrong_state(fleet, factory, clock, create):
    fleet.add_devices(3)
    rollout_id = create()
    with session_scope(factory) as session, pytest.raises(RolloutStateError, match="cannot resume rollout"):
        service.act(session, rollout_id, "resume", "key:1:alice", now=clock())
    with session_scope(factory) as session:
        service.act(session, rollout_id, "abort", "key:1:alice", now=clock())
    with session_scope(factory) as session, pytest.raises(RolloutStateError, match="it is aborted"):
        service.act(session, rollout_id, "approve", "key:1:alice", now=clock())


def test_draft_does_nothing_until_started(fleet, factory, engine, clock, create):
    fleet.add_devices(3)
    rollout_id = create(draft=True)
    engine.tick()
    assert state(factory, rollout_id)[0].state == "draft" and not released(factory, rollout_id)
    with session_scope(factory) as session:
        service.act(session, rollout_id, "start", "key:1:alice", now=clock())
    engine.tick()
    assert len(released(factory, rollout_id)) == 1


def fleet_caps():
    from tests.fleet_server.rollouts.fleetsim import CAPS

    return dict(CAPS)


def test_assignments_untouched_by_other_models(fleet, factory, create):
    ids = fleet.add_devices(2)
    with session_scope(factory) as session:
        session.add(Assignment(device_id=ids[0], model_name="other", bundle_version=7, pinned=True, updated_at=T0))
    create(waves="100%")
    assert fleet.assignment(ids[0], "other").bundle_version == 7


def test_approval_to_start_then_runs_alone_and_cannot_be_dodged_by_pause_and_resume(
    fleet, factory, engine, clock, create
):
    fleet.add_devices(10)
    rollout_id = create(approval="start", waves="10%,100%")
    with session_scope(factory) as session, pytest.raises(RolloutStateError, match="allowed: abort, approve, rollback"):
        service.act(session, rollout_id, "pause", "key:1:alice", now=clock())
    engine.tick()
    assert not released(factory, rollout_id)
    with session_scope(factory) as session:
        service.act(session, rollout_id, "approve", "key:1:alice", now=clock())
    drive(engine, factory, clock, rollout_id, lambda d, t: fleet.healthy_device(d, 2, t, SOAK_S))
    assert state(factory, rollout_id)[0].state == "completed"
