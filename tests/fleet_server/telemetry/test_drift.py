"""Drift end to end: a device's real windows uploaded, PSI against the published bundle's baseline, alerts."""

from __future__ import annotations

import datetime as dt

from fleet_server.db import session_scope
from fleet_server.telemetry import monitors
from tests.fleet_server.telemetry.helpers import simulate, uniform, upload

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def test_a_shifted_input_raises_an_alert_and_an_unshifted_one_stays_under_warn(
    client, release, make_device, session_factory, tmp_path
):
    release.publish("tiny", 1)
    bundle_dir = release.work_dir / "tiny-1"
    device = make_device()

    calm = simulate(bundle_dir, tmp_path, uniform(1500, seed=1), NOW - dt.timedelta(hours=3))
    upload(calm, client, device.headers)
    with session_scope(session_factory) as session:
        assert monitors.evaluate(session, "tiny", now=NOW - dt.timedelta(hours=2)) == []
        (drift,) = monitors.drift_by_version(session, "tiny", NOW - dt.timedelta(hours=4), NOW)
    assert drift.version == 1 and drift.rows == 1500
    assert set(drift.psi) == {"f0", "f1", "f2", "f3", "output:label"}
    assert max(drift.psi.values()) < 0.1, drift.psi

    drifted = uniform(1500, seed=2, shift={0: 1.5, 1: -1.0})
    shifted = simulate(bundle_dir, tmp_path, drifted, NOW - dt.timedelta(minutes=50))
    upload(shifted, client, device.headers)
    response = client.post("/api/v1/admin/drift/tiny/evaluate", headers=release.headers)
    assert response.status_code == 200, response.text
    alerts = {a["feature"]: a for a in response.json()}
    assert {"f0", "f1"} <= set(alerts) <= {"f0", "f1", "output:label"}
    assert alerts["f0"]["level"] == "alert" and alerts["f0"]["psi"] > 0.25
    assert alerts["f1"]["level"] == "alert" and alerts["f1"]["psi"] > 0.25

    listed = client.get("/api/v1/admin/drift-alerts", params={"model": "tiny"}, headers=release.headers).json()
    assert {a["feature"] for a in listed} == set(alerts)
    with session_scope(session_factory) as session:  # the periodic evaluation finds the same, idempotently
        assert {a.feature for a in monitors.evaluate_all(session)} == set(alerts)
        assert len(monitors.list_alerts(session, "tiny")) == len(alerts)

    per_version = client.get("/api/v1/admin/drift/tiny", headers=release.headers).json()
    psi = per_version["versions"][0]["psi"]
    assert psi["f2"] < 0.1 and psi["f3"] < 0.1
    assert per_version["monitor"] == {"model": "tiny", "warn_psi": 0.1, "alert_psi": 0.25, "lookback_s": 3600,
                                      "min_rows": 200, "enabled": True, "overridden": False}  # fmt: skip


def test_alerts_resolve_when_the_distribution_comes_back(client, release, make_device, session_factory, tmp_path):
    release.publish("tiny", 1)
    device = make_device()
    bundle_dir = release.work_dir / "tiny-1"
    drifted = simulate(bundle_dir, tmp_path, uniform(600, 3, {2: 2.0}), NOW - dt.timedelta(hours=3))
    upload(drifted, client, device.headers)
    with session_scope(session_factory) as session:
        opened = monitors.evaluate(session, "tiny", now=NOW - dt.timedelta(hours=2))
    assert [a.feature for a in opened if not a.feature.startswith("output")] == ["f2"]

    upload(simulate(bundle_dir, tmp_path, uniform(600, 4), NOW - dt.timedelta(minutes=30)), client, device.headers)
    with session_scope(session_factory) as session:
        assert [a for a in monitors.evaluate(session, "tiny", now=NOW) if a.bundle_version == 1] == []
        resolved = monitors.list_alerts(session, "tiny", open_only=False)
    assert resolved and all(a.resolved_at is not None for a in resolved)


def test_a_per_model_override_changes_the_levels(client, release, make_device, tmp_path):
    release.publish("tiny", 1)
    device = make_device()
    upload(simulate(release.work_dir / "tiny-1", tmp_path, uniform(600, 5, {0: 0.8}), NOW - dt.timedelta(minutes=20)),
           client, device.headers)  # fmt: skip
    default = client.post("/api/v1/admin/drift/tiny/evaluate", headers=release.headers).json()
    f0 = next(a for a in default if a["feature"] == "f0")

    body = {"warn_psi": round(f0["psi"] + 0.5, 3), "alert_psi": round(f0["psi"] + 1.0, 3)}
    put = client.put("/api/v1/admin/drift/tiny/monitor", headers=release.headers, json=body)
    assert put.status_code == 200 and put.json()["overridden"] is True
    after = client.post("/api/v1/admin/drift/tiny/evaluate", headers=release.headers).json()
    assert "f0" not in {a["feature"] for a in after}  # under the raised warn level: resolved


def test_bad_thresholds_are_a_400_and_viewers_cannot_change_them(client, admin_headers, viewer_headers):
    body = {"warn_psi": 0.5, "alert_psi": 0.2}
    bad = client.put("/api/v1/admin/drift/tiny/monitor", headers=admin_headers, json=body)
    assert bad.status_code == 400 and "warn <= alert" in bad.json()["detail"]
    refused = client.put("/api/v1/admin/drift/tiny/monitor", headers=viewer_headers, json={"warn_psi": 0.2})
    assert refused.status_code == 403
    assert client.get("/api/v1/admin/drift/tiny/monitor", headers=viewer_headers).json()["overridden"] is False


def test_the_maintenance_tick_evaluates_drift_and_prunes_once_a_day(client, release, make_device, session_factory,
                                                                    tmp_path):  # fmt: skip
    from fleet_server.telemetry.tasks import Maintenance

    release.publish("tiny", 1)
    device = make_device()
    old = simulate(release.work_dir / "tiny-1", tmp_path, uniform(300, 8), NOW - dt.timedelta(days=100))
    shifted = uniform(600, 9, {3: 1.5})
    drifted = simulate(release.work_dir / "tiny-1", tmp_path, shifted, NOW - dt.timedelta(minutes=20))
    old_windows = old.count_by_label()["window:window"]
    upload(old, client, device.headers)
    upload(drifted, client, device.headers)

    maintenance = Maintenance(session_factory)
    first = maintenance.tick(NOW)
    assert first["open_alerts"] >= 1 and first["metric_windows"] == old_windows > 0
    second = maintenance.tick(NOW + dt.timedelta(minutes=5))
    assert "metric_windows" not in second  # pruning runs once a day
    with session_scope(session_factory) as session:
        assert "f3" in {a.feature for a in monitors.list_alerts(session, "tiny")}
