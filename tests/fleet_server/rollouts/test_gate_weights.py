"""One device cannot make a failing wave pass: gates count each device at most as twice the median device.

Against the real engine on SQLite and PostgreSQL, with every report sent through the real device
API: a rollout of ``digits@2`` to six enrolled devices, waves ``50%,100%`` (three devices in wave 1).
A compromised device may claim up to 10^12 requests in one window within the window contract, all
clean, fast and undrifted; the error-rate, p99 latency and drift gates must still read the wave's
other devices (``fleet_server.rollouts.weights``). A device that honestly carries most of a wave's
traffic counts as twice the median device: its figures are in the gate beside the others'.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select

from fleet_server.db import session_scope
from fleet_server.models import Assignment, DeviceGroup, DeviceGroupMember
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.service import CreateRequest, create_rollout
from fleet_server.rollouts.weights import bound
from tests.fleet_server.rollouts.conftest import SOAK_S, policy
from tests.fleet_server.rollouts.fleetsim import T0, window_payload

TRILLION = 10**12 - 1  # the most one window may claim (the contract's bound) on top of a device's usual window


def start_rollout(factory, clock, make_device, gates, devices=6, waves="50%,100%"):
    """Enroll ``devices`` devices on digits@1, roll out digits@2 in ``waves`` with ``gates``; tick once.
    Returns the engine, the rollout id and wave 1's devices (and, as ``engine.control``, the others)."""
    enrolled = [make_device() for _ in range(devices)]
    with session_scope(factory) as session:
        group = DeviceGroup(name="lab")
        session.add(group)
        session.flush()
        for device in enrolled:
            session.add(DeviceGroupMember(group_id=group.id, device_id=device.device_id))
            session.add(Assignment(device_id=device.device_id, model_name="digits", bundle_version=1,
                                   variant="onnx-fp32", pinned=False, updated_at=T0))  # fmt: skip
        request = CreateRequest("digits", 2, ("group:lab",), policy(waves=waves, gates=gates))
        rollout_id = create_rollout(session, request, "test", clock()).id
    engine = RolloutEngine(factory, clock=clock)
    engine.tick()
    by_id = {d.device_id: d for d in enrolled}
    with factory() as session:
        query = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout_id,
                                                      RolloutDevice.released_at.is_not(None))  # fmt: skip
        wave1 = sorted((by_id[d] for d in session.scalars(query)), key=lambda d: d.device_id)
    assert len(wave1) == 3
    engine.control = sorted((d for d in enrolled if d not in wave1), key=lambda d: d.device_id)
    return engine, rollout_id, wave1


def report(client, device, manifest, version=2, **window):
    """An install event (of version 2) and one window of ``digits@version`` covering the soak, through the real
    device API."""
    start = T0 + dt.timedelta(seconds=10)
    install = {"id": uuid.uuid4().hex, "type": "install", "at": (T0 + dt.timedelta(seconds=5)).isoformat(),
               "model": "digits", "version": 2, "result": "installed"}  # fmt: skip
    body = {"batch_id": uuid.uuid4().hex, "samples": [], "events": [install] if version == 2 else [],
            "windows": [{"id": uuid.uuid4().hex, "model": "digits", "version": version, "start": start.isoformat(),
                         "end": (start + dt.timedelta(seconds=SOAK_S + 1)).isoformat(),
                         **window_payload(manifest, **window)}]}  # fmt: skip
    response = client.post("/api/v1/device/telemetry", json=body, headers=device.headers)
    assert response.status_code == 200, response.text


def outcome(factory, clock, engine, rollout_id):
    """Tick after the soak; the rollout's state, wave 1's evaluation and the engine's last decision."""
    clock.advance(SOAK_S + 2)
    engine.tick()
    with factory() as session:
        state = session.get(Rollout, rollout_id).state
        wave = session.scalar(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id,
                                                        RolloutWave.index == 0))  # fmt: skip
        decision = session.scalars(select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id)
                                   .order_by(RolloutDecision.id.desc())).first()  # fmt: skip
        return state, wave.evaluation, decision


@pytest.mark.parametrize(
    ("gate", "bad", "clean", "breach"),
    [
        ("error_rate<0.01 min=50", {"errors": 30}, {}, "error_rate=0.15 breached <0.01"),
        ("p99_ms<40 min=50", {"latency_ms": 80.0}, {"latency_ms": 2.0}, "p99_ms="),
        ("psi<0.2 min=50", {"drift": True}, {}, "psi="),
    ],
    ids=["error_rate", "p99_ms", "psi"],
)
def test_one_device_claiming_a_trillion_clean_requests_cannot_pass_a_failing_gate(
    client, fleet, factory, clock, make_device, gate, bad, clean, breach
):
    engine, rollout_id, wave1 = start_rollout(factory, clock, make_device, (gate,))
    for device in wave1:  # the new bundle fails this gate on every device
        report(client, device, fleet.manifests[2], requests=100, **bad)
    report(client, wave1[0], fleet.manifests[2], requests=TRILLION, **clean)  # one device: a trillion clean ones
    state, evaluation, decision = outcome(factory, clock, engine, rollout_id)
    assert state == "rolled_back"
    assert decision.action == "rollback" and breach in decision.reason
    assert "1 device counted at most as twice the median device" in decision.reason
    canary = evaluation["canary"]
    assert canary["bounded_devices"] == 1 and canary["request_cap"] == 200
    assert canary["requests"] == pytest.approx(400)  # two devices of 100, the third counted as 200


def test_the_trillion_requests_are_counted_as_two_median_devices_of_clean_traffic(client, fleet, factory, clock,
                                                                                   make_device):  # fmt: skip
    engine, rollout_id, wave1 = start_rollout(factory, clock, make_device, ("error_rate<0.2 min=50",))
    for device in wave1:
        report(client, device, fleet.manifests[2], requests=100, errors=30)
    report(client, wave1[0], fleet.manifests[2], requests=TRILLION)
    state, evaluation, decision = outcome(factory, clock, engine, rollout_id)
    # 30 + 30 errors of the two others' 200 requests, and the third's 30 of 10^12 + 99 scaled to 200 requests
    assert evaluation["canary"]["errors"] == pytest.approx(60, abs=1e-6)
    assert evaluation["canary"]["error_rate"] == pytest.approx(60 / 400)
    assert state == "running" and decision.action == "advance"  # 0.15 is within <0.2: the bound is a weight


@pytest.mark.parametrize(("busy_errors", "state", "action"),
                         [(30, "rolled_back", "rollback"), (0, "running", "advance")],
                         ids=["busy-device-failing", "busy-device-healthy"])  # fmt: skip
def test_a_device_that_honestly_carries_most_traffic_counts_as_twice_the_median_device(
    client, fleet, factory, clock, make_device, busy_errors, state, action
):
    engine, rollout_id, wave1 = start_rollout(factory, clock, make_device, ("error_rate<0.01 min=50",))
    busy, *quiet = wave1
    report(client, busy, fleet.manifests[2], requests=10_000, errors=busy_errors * 100)  # 30 % of its requests, or 0
    for device in quiet:
        report(client, device, fleet.manifests[2], requests=100)
    got, evaluation, decision = outcome(factory, clock, engine, rollout_id)
    assert (got, decision.action) == (state, action)
    canary = evaluation["canary"]
    assert canary["bounded_devices"] == 1 and canary["requests"] == pytest.approx(400)
    assert canary["error_rate"] == pytest.approx(0.3 * 200 / 400 if busy_errors else 0.0)  # still fails the wave


def test_devices_with_similar_traffic_are_summed_as_they_always_were(client, fleet, factory, clock, make_device):
    engine, rollout_id, wave1 = start_rollout(factory, clock, make_device, ("error_rate<0.01 min=50",))
    for device, (requests, errors) in zip(wave1, [(100, 0), (150, 1), (190, 0)], strict=True):
        report(client, device, fleet.manifests[2], requests=requests, errors=errors)  # all under 2x the median (150)
    state, evaluation, decision = outcome(factory, clock, engine, rollout_id)
    canary = evaluation["canary"]
    assert canary["bounded_devices"] == 0 and canary["request_cap"] == 300
    assert canary["requests"] == 440 and type(canary["requests"]) is int and canary["errors"] == 1
    assert state == "running" and "error_rate=0.002273 within <0.01 over 440 requests" in decision.reason


def test_a_gate_relative_to_the_previous_version_is_not_fooled_by_one_device_still_on_it(
    client, fleet, factory, clock, make_device
):
    engine, rollout_id, wave1 = start_rollout(factory, clock, make_device, ("error_rate<2x min=50",), devices=10,
                                              waves="30%,100%")  # fmt: skip
    for device in wave1:  # the new bundle: 30 % errors
        report(client, device, fleet.manifests[2], requests=100, errors=30)
    for device in engine.control:  # the previous version: 1 %
        report(client, device, fleet.manifests[1], version=1, requests=100, errors=1)
    liar = engine.control[0]  # claims its previous version fails half of a trillion requests
    report(client, liar, fleet.manifests[1], version=1, requests=TRILLION, errors=TRILLION // 2)
    state, evaluation, decision = outcome(factory, clock, engine, rollout_id)
    assert state == "rolled_back" and "error_rate=0.3 breached <0.265" in decision.reason
    control = evaluation["control"]
    assert control["bounded_devices"] == 1 and control["requests"] == pytest.approx(800)  # 6 x 100 and 200
    assert control["error_rate"] == pytest.approx((6 + 100) / 800, rel=1e-6)  # the liar's half of its 200: 2x is 0.265


def shares(*rows):
    return [(f"d{i}", *row) for i, row in enumerate(rows)]


def test_the_cap_is_twice_the_lower_median_of_the_devices_that_reported_that_kind_of_sample():
    result = bound(shares((100, 0, 0), (10**12, 0, 0)))  # two devices: the lower median is the smaller one
    assert result.caps == {"requests": 200, "shadow_samples": None, "generations": None}
    assert result.weights == {"d1": 200 / 10**12}
    idle = bound(shares((0, 0, 0), (0, 0, 0), (0, 0, 0), (50, 0, 0), (80, 0, 0)))  # idle devices do not lower it
    assert idle.caps["requests"] == 100 and idle.weights == {}
    shadow = bound(shares((100, 100, 0), (100, 100, 0), (100, 10**9, 0)))  # each kind of sample has its own cap
    assert shadow.weights == {"d2": 200 / 10**9}
    assert bound([]).weights == {} and bound(shares((10**12, 0, 0))).weights == {}  # a lone device is its own median
