"""Reading device progress from stored telemetry: install events, heartbeats, metric windows."""

from __future__ import annotations

import datetime as dt

from fleet_server.db import session_scope
from fleet_server.models import DeviceEvent, TelemetryBatch
from fleet_server.rollouts.decisions import DeviceOutcome, classify_device
from fleet_server.rollouts.observe import observe_devices
from tests.fleet_server.rollouts.fleetsim import T0

SOAK = 600.0


def at(seconds):
    return T0 + dt.timedelta(seconds=seconds)


def heartbeat(factory, device_id, when, models):
    with session_scope(factory) as session:
        batch = TelemetryBatch(device_id=device_id, batch_id=f"hb-{device_id}-{when.timestamp()}")
        session.add(batch)
        session.flush()
        payload = {"type": "heartbeat", "models": models}
        session.add(DeviceEvent(batch_pk=batch.id, device_id=device_id, type="heartbeat", model_name=None,
                                bundle_version=None, at=when, payload=payload))  # fmt: skip


def outcome(factory, device_id, now_s, shadow=False, known=None):
    with factory() as session:
        obs = observe_devices(session, "digits", 2, {device_id: T0}, shadow, known)[device_id]
    return classify_device(obs, SOAK, 300.0, at(now_s))


def test_heartbeats_alone_carry_a_device_through_the_soak(fleet, factory):
    (device,) = fleet.add_devices(1)
    heartbeat(factory, device, at(5), [{"name": "digits", "version": 2, "state": "trial"}])
    assert outcome(factory, device, 10)[0] is DeviceOutcome.SOAKING
    heartbeat(factory, device, at(606), [{"name": "digits", "version": 2, "state": "active"},
                                        {"name": "digits", "version": 1, "state": "previous"}])  # fmt: skip
    assert outcome(factory, device, 606, known={device: at(5)})[0] is DeviceOutcome.HEALTHY


def test_a_heartbeat_showing_the_old_version_active_again_means_the_device_rolled_back(fleet, factory):
    (device,) = fleet.add_devices(1)
    fleet.install(device, 2, at(5))
    heartbeat(factory, device, at(60), [{"name": "digits", "version": 1, "state": "active"},
                                       {"name": "digits", "version": 2, "state": "previous"}])  # fmt: skip
    assert outcome(factory, device, 60)[0] is DeviceOutcome.FAILED


def test_events_from_before_the_release_are_ignored(fleet, factory):
    (device,) = fleet.add_devices(1)
    fleet.install(device, 2, at(-301))
    fleet.report(device, 2, at(-1000), 10, requests=100)
    assert outcome(factory, device, 10)[0] is DeviceOutcome.INSTALLING
    fleet.install(device, 2, at(-299))  # within the clock-skew allowance
    assert outcome(factory, device, 10)[0] is DeviceOutcome.SOAKING


def test_the_latest_install_event_wins(fleet, factory):
    (device,) = fleet.add_devices(1)
    fleet.install(device, 2, at(5), result="failed", reason="download interrupted")
    assert outcome(factory, device, 6) == (DeviceOutcome.FAILED, "install failed: download interrupted")
    fleet.install(device, 2, at(50))
    assert outcome(factory, device, 60)[0] is DeviceOutcome.SOAKING


def test_windows_on_the_new_version_count_as_running_and_reporting(fleet, factory):
    (device,) = fleet.add_devices(1)
    fleet.report(device, 2, at(10), 300, requests=10)
    assert outcome(factory, device, 320)[0] is DeviceOutcome.SOAKING
    fleet.report(device, 2, at(310), 301, requests=10)
    assert outcome(factory, device, 620)[0] is DeviceOutcome.HEALTHY


def test_a_shadow_device_is_running_once_it_reports_the_shadow_installed(fleet, factory):
    (device,) = fleet.add_devices(1)
    fleet.install(device, 2, at(5))
    fleet.report(device, 1, at(5), SOAK + 1, requests=100, shadow=(100, 100))
    assert outcome(factory, device, SOAK + 10, shadow=True)[0] is DeviceOutcome.HEALTHY
