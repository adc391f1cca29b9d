"""No device can stop a rollback, and one broken rollout cannot stop the others (SQLite and PostgreSQL).

Two rollouts run side by side: ``digits@2`` (a bad bundle: 30 % of requests fail) and ``other@2``
(healthy). Their devices enroll and report through the real device API. One device of the bad
rollout sends a window with ``1e309`` requests (the finding of issue 15 that froze every rollout),
and a window that breaks the contract is also written straight into the database, as if stored
before intake checked windows. The bad rollout must still be rolled back on the other devices'
numbers, with the stored bad window left out and counted, and the good rollout must advance.

The fold that every rollout waits for must not stop on a stored event either (heartbeats and install
events that break their contract, written past intake), nor on a row whose folding raises for a
reason nobody foresaw; and a tick that raises is counted, the next one running as usual.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import select, text

from fleet_server.db import session_scope
from fleet_server.models import Assignment, DeviceGroup, DeviceGroupMember, MetricWindow
from fleet_server.observability import Metrics
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice, RolloutWave
from fleet_server.rollouts.observe import Evidence
from fleet_server.rollouts.service import CreateRequest, create_rollout
from tests.fleet_server.rollouts.conftest import SOAK_S, policy
from tests.fleet_server.rollouts.fleetsim import T0, publish, window_payload

GATES = ("error_rate<0.01 min=50",)


@pytest.fixture
def two_rollouts(fleet, factory, clock, make_device, tmp_path):
    """Rollouts of digits@2 (group a) and other@2 (group b), four enrolled devices each, wave 1 released."""
    with session_scope(factory) as session:
        for version in (1, 2):
            fleet.manifests[("other", version)] = publish(session, tmp_path, "other", version)
    groups = {"digits": ("a", [make_device() for _ in range(4)]), "other": ("b", [make_device() for _ in range(4)])}
    ids = {}
    with session_scope(factory) as session:
        for model, (name, devices) in groups.items():
            group = DeviceGroup(name=name)
            session.add(group)
            session.flush()
            for device in devices:
                session.add(DeviceGroupMember(group_id=group.id, device_id=device.device_id))
                session.add(Assignment(device_id=device.device_id, model_name=model, bundle_version=1,
                                       variant="onnx-fp32", pinned=False, updated_at=T0))  # fmt: skip
        for model, (name, _) in groups.items():
            request = CreateRequest(model, 2, (f"group:{name}",), policy(waves="50%,100%", gates=GATES))
            ids[model] = create_rollout(session, request, "test", clock()).id
    engine = RolloutEngine(factory, clock=clock, metrics=Metrics())
    engine.tick()
    devices = {d.device_id: d for _, ds in groups.values() for d in ds}
    return engine, ids, {model: released(factory, ids[model], devices) for model in groups}


def released(factory, rollout_id, devices):
    with factory() as session:
        query = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout_id,
                                                      RolloutDevice.released_at.is_not(None))  # fmt: skip
        return [devices[d] for d in session.scalars(query)]


def report(client, device, manifest, model, window_overrides=None, **counts):
    """An install event and one window covering the soak, through the real device API."""
    start = T0 + dt.timedelta(seconds=10)
    window = {"id": uuid.uuid4().hex, "model": model, "version": 2, "start": start.isoformat(),
              "end": (start + dt.timedelta(seconds=SOAK_S + 1)).isoformat(), **window_payload(manifest, **counts),
              **(window_overrides or {})}  # fmt: skip
    event = {"id": uuid.uuid4().hex, "type": "install", "at": (T0 + dt.timedelta(seconds=5)).isoformat(),
             "model": model, "version": 2, "result": "installed"}  # fmt: skip
    body = {"batch_id": uuid.uuid4().hex, "events": [event], "windows": [window], "samples": []}
    raw = json.dumps(body, allow_nan=True).replace('"__INF__"', "1e309")
    return client.post("/api/v1/device/telemetry", content=raw,
                       headers={**device.headers, "Content-Type": "application/json"})  # fmt: skip


def decisions(factory, rollout_id):
    with factory() as session:
        query = select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id).order_by(RolloutDecision.id)
        return [(d.action, d.reason) for d in session.scalars(query)]


def test_a_poisoned_window_cannot_stop_the_rollback_nor_the_other_rollout(client, fleet, factory, clock, two_rollouts):
    engine, ids, wave1 = two_rollouts
    bad, good = wave1["digits"], wave1["other"]
    poisoned = report(client, bad[0], fleet.manifests[2], "digits", {"counters": {"requests": "__INF__"}}, requests=1)
    assert poisoned.status_code == 400
    assert poisoned.json()["detail"].startswith("windows[0].counters.requests: inf is not a finite number")
    for device in bad:
        assert report(client, device, fleet.manifests[2], "digits", requests=100, errors=30).status_code == 200
    for device in good:
        assert report(client, device, fleet.manifests[("other", 2)], "other", requests=100).status_code == 200
    with session_scope(factory) as session:  # a bad window stored past intake (e.g. before it checked windows)
        broken = {"counters": {"requests": "lots"}, "latency_ms": {"counts": [-1]}}
        session.add(MetricWindow(batch_pk=0, device_id=bad[1].device_id, model_name="digits", bundle_version=2,
                                 window_start=T0 + dt.timedelta(seconds=20), window_end=T0 + dt.timedelta(seconds=80),
                                 payload=broken))  # fmt: skip
    clock.advance(SOAK_S + 2)
    engine.tick()
    with factory() as session:
        assert session.get(Rollout, ids["digits"]).state == "rolled_back"
        assert session.get(Rollout, ids["other"]).state == "running"
        wave = session.scalar(select(RolloutWave).where(RolloutWave.rollout_id == ids["digits"],
                                                        RolloutWave.index == 0))  # fmt: skip
        assert wave.evaluation["canary"]["invalid_windows"] == 1
        assert wave.evaluation["canary"]["requests"] == 200 and wave.evaluation["canary"]["errors"] == 60
    (rollback,) = [reason for action, reason in decisions(factory, ids["digits"]) if action == "rollback"]
    assert "error_rate=0.3 breached <0.01 over 200 requests" in rollback
    assert [a for a, _ in decisions(factory, ids["other"])] == ["create", "start", "advance"]


def test_a_rollout_whose_evaluation_fails_pauses_itself_and_the_others_go_on(client, fleet, factory, clock,
                                                                             two_rollouts):  # fmt: skip
    engine, ids, wave1 = two_rollouts
    for device in wave1["other"]:
        assert report(client, device, fleet.manifests[("other", 2)], "other", requests=100).status_code == 200
    with session_scope(factory) as session:  # a rollout whose stored policy no longer parses
        rollout = session.get(Rollout, ids["digits"])
        rollout.policy = {**rollout.policy, "waves": [{"percent": "many"}]}
    clock.advance(SOAK_S + 2)
    made = engine.tick()
    assert {d.action for d in made} == {"pause_on_error", "advance"}
    with factory() as session:
        assert session.get(Rollout, ids["digits"]).state == "paused"
        assert session.get(Rollout, ids["other"]).current_wave == 1
    action, reason = decisions(factory, ids["digits"])[-1]
    assert action == "pause_on_error" and reason.startswith("evaluation failed: ")
    assert engine.metrics.rollout_evaluation_failures._value.get() == 1
    assert engine.metrics.rollout_decisions.labels("advance")._value.get() == 1
    assert engine.tick() == []  # a paused rollout is not evaluated again until an operator resumes it


def store_event_past_intake(engine, device_id: str, kind: str, payload_text: str) -> None:
    """An event row whose payload is this JSON text, written as if stored before intake checked events."""
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO telemetry_batches (device_id, batch_id, received_at, events, windows,"
                                " samples, size_bytes) VALUES (:d, :b, :t, 1, 0, 0, 1)"),
                           {"d": device_id, "b": uuid.uuid4().hex, "t": T0})  # fmt: skip
        batch_pk = connection.execute(text("SELECT max(id) FROM telemetry_batches")).scalar_one()
        connection.execute(text("INSERT INTO device_events (batch_pk, device_id, type, model_name, bundle_version,"
                                " at, payload, folded) VALUES (:pk, :d, :k, :m, 2, :at, :p, false)"),
                           {"pk": batch_pk, "d": device_id, "k": kind, "m": "digits" if kind == "install" else None,
                            "at": T0 + dt.timedelta(seconds=30), "p": payload_text})  # fmt: skip


BROKEN_EVENTS = [  # each breaks the event contract in a way that once raised while folding
    ("heartbeat", '{"type": "heartbeat", "models": [{"name": "digits", "version": 2, "state": []}]}'),
    ("heartbeat", '{"type": "heartbeat", "models": [{"name": "other", "version": 2, "state": {"a": 1}}]}'),
    ("install", '{"type": "install", "result": "failed", "reason": "flash \\ud800 worn"}'),
    ("heartbeat", '{"type": "heartbeat", "models": "all of them"}'),
    ("install", "[1, 2, 3]"),
]


def test_stored_events_that_break_their_contract_cannot_stop_the_fold_nor_any_rollout(
    client, fleet, factory, clock, two_rollouts, db_engine
):
    engine, ids, wave1 = two_rollouts
    bad, good = wave1["digits"], wave1["other"]
    for device in (*bad, *good):
        for kind, payload in BROKEN_EVENTS:
            store_event_past_intake(db_engine, device.device_id, kind, payload)
    for device in bad:
        assert report(client, device, fleet.manifests[2], "digits", requests=100, errors=30).status_code == 200
    for device in good:
        assert report(client, device, fleet.manifests[("other", 2)], "other", requests=100).status_code == 200
    clock.advance(SOAK_S + 2)
    engine.tick()
    with factory() as session:
        assert session.get(Rollout, ids["digits"]).state == "rolled_back"
        assert session.get(Rollout, ids["other"]).state == "running"
        assert session.get(Rollout, ids["other"]).current_wave == 1
        (failure,) = {d.failure for d in session.scalars(select(RolloutDevice).where(
            RolloutDevice.rollout_id == ids["digits"], RolloutDevice.released_at.is_not(None)))}  # fmt: skip
    assert failure == "install failed: flash \\ud800 worn"  # the reason kept, its lone surrogate escaped
    assert engine.metrics.invalid_events._value.get() == 0  # each read for what it says right, none left out
    assert engine.metrics.rollout_tick_s._sum.get() > 0


def test_a_report_whose_folding_raises_is_left_out_and_the_fold_goes_on(client, fleet, factory, clock, two_rollouts,
                                                                        monkeypatch):  # fmt: skip
    engine, ids, wave1 = two_rollouts
    for device in wave1["digits"]:
        assert report(client, device, fleet.manifests[2], "digits", requests=100, errors=30).status_code == 200
    for device in wave1["other"]:
        assert report(client, device, fleet.manifests[("other", 2)], "other", requests=100).status_code == 200
    fold_install = Evidence.fold_install
    calls = []

    def fails_once(self, *args, **kwargs):  # a bug met by one stored row, whatever it is
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug met by one row")
        return fold_install(self, *args, **kwargs)

    monkeypatch.setattr(Evidence, "fold_install", fails_once)
    clock.advance(SOAK_S + 2)
    engine.tick()
    with factory() as session:
        assert session.get(Rollout, ids["digits"]).state == "rolled_back"
        assert session.get(Rollout, ids["other"]).current_wave == 1
    assert engine.metrics.invalid_events._value.get() == 1


def test_a_tick_that_raises_is_counted_and_the_next_tick_runs(factory, clock, monkeypatch):
    from sqlalchemy.exc import OperationalError

    engine = RolloutEngine(factory, clock=clock, metrics=Metrics())

    def unavailable(_factory):
        raise OperationalError("SELECT 1", {}, Exception("the database went away"))

    monkeypatch.setattr("fleet_server.rollouts.engine.fold_pending", unavailable)
    assert engine.tick_guarded() == []
    assert engine.metrics.rollout_tick_failures._value.get() == 1
    monkeypatch.undo()
    assert engine.tick_guarded() == [] and engine.metrics.rollout_tick_failures._value.get() == 1


def test_one_device_claiming_a_trillion_clean_requests_cannot_pass_a_failing_wave(client, fleet, factory, clock,
                                                                                  two_rollouts):  # fmt: skip
    engine, ids, wave1 = two_rollouts
    bad = wave1["digits"]
    for device in bad:
        assert report(client, device, fleet.manifests[2], "digits", requests=100, errors=30).status_code == 200
    inflated = report(client, bad[0], fleet.manifests[2], "digits", requests=10**12 - 1)  # one window, no errors
    assert inflated.status_code == 200  # within the window contract
    clock.advance(SOAK_S + 2)
    engine.tick()
    with factory() as session:
        assert session.get(Rollout, ids["digits"]).state == "rolled_back"
