"""End to end with real agents: the fleet server on loopback, real ``edgefleet-agent`` processes
(TUF downloads, A/B slots, golden self-test, ONNX Runtime, telemetry uploads), an app sending live
inference requests to each agent's localhost OIP API, and the rollout engine deciding on what the
agents report. The engine is ticked through the admin API (``POST .../evaluate``), which runs the
same evaluation as the server's loop.

In order, on one fleet of three running agents and one enrolled agent that never runs:
1. a good bundle goes through every wave and completes;
2. a drifting bundle (its drift baseline does not match live inputs) stops at the first wave and is
   rolled back; the canary serves the previous bundle again;
3. a bundle that fails on live inputs (its batch dimension is fixed to 1, the app sends 2 rows; the
   golden self-test uses 1 row so it installs) stops at the first wave and is rolled back;
4. a device that never reports times out and the rollout is rolled back.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from bundles.archive import pack_variant
from bundles.manifest import Histogram, Manifest
from bundles.testing import build_bundle_dir, write_manifest
from fleet_server.db import session_scope
from fleet_server.models import Device, DeviceGroup, DeviceGroupMember, MetricWindow
from tests.device_agent.e2e_support import Daemon, Fleet, agent_cli, start_daemon

ROLLOUTS = "/api/v1/admin/rollouts"
# PSI is biased upwards by about (bins - 1) / rows on small samples: 100 requests of 2 rows keep it near 0.035.
GATES = ["error_rate<0.01 min=50", "fallback_rate<0.05 min=50", "psi<0.2 min=100"]


def publish(fleet: Fleet, version: int, drifting: bool = False, fixed_batch: bool = False) -> None:
    """A real ``digits`` bundle, signed with the release key and published through the admin API."""
    from bundles.tuf.publication import make_publication

    src = fleet.work / f"src-digits-{version}"
    manifest = build_bundle_dir(src, name="digits", version=version, seed=version, dynamic_batch=not fixed_batch)
    if drifting:
        manifest = _with_baseline_elsewhere(manifest)
        write_manifest(src, manifest)
    files = {f"digits/{version}/manifest.json": src / "manifest.json"}
    for variant in manifest.variants:
        out = pack_variant(src, manifest, variant.id, fleet.work / f"digits-{version}-{variant.id}.tar.gz")
        files[f"digits/{version}/{variant.id}.tar.gz"] = out
    state = fleet.http.get("/api/v1/admin/tuf/state", headers=fleet.admin).json()
    current = None
    if state["targets"] is not None:
        current = fleet.http.get(f"/tuf/metadata/{state['targets']['signed']['version']}.targets.json").content
    root = fleet.http.get("/tuf/metadata/root.json").content
    publication = make_publication(current, root, files, fleet.targets_signer, fleet.work / f"pub-{uuid.uuid4().hex}")
    answer = fleet.http.post("/api/v1/admin/publications", headers=fleet.admin, content=publication.read_bytes())
    assert answer.status_code == 201, answer.text


def _with_baseline_elsewhere(manifest: Manifest) -> Manifest:
    """The same model, but a training baseline that put every input in the lowest bin."""
    shifted = tuple(dataclasses.replace(h, freqs=(1.0,) + (0.0,) * (len(h.freqs) - 1))
                    for h in manifest.drift_baseline.features)  # fmt: skip
    baseline = dataclasses.replace(manifest.drift_baseline, features=shifted)
    assert all(isinstance(h, Histogram) for h in shifted)
    return dataclasses.replace(manifest, drift_baseline=baseline)


class App:
    """An application on the device: sends 2-row requests with inputs like the training data."""

    def __init__(self, daemon: Daemon) -> None:
        self.url, self.stop, self.answers = daemon.url, threading.Event(), 0
        self.versions: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng()
        with httpx.Client(timeout=5) as http:
            while not self.stop.is_set():
                x = rng.uniform(-2, 2, size=(2, 4)).astype(np.float32)
                body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
                try:
                    answer = http.post(f"{self.url}/v2/models/digits/infer", json=body)
                    if answer.status_code == 200:
                        self.answers += 1
                        self.versions.append(str(answer.json().get("model_version")))
                except httpx.HTTPError:
                    pass
                time.sleep(0.002)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = Fleet(tmp_path_factory.mktemp("rollout-fleet"))
    for field, value in (("telemetry_window_s", 1), ("telemetry_upload_interval_s", 1)):
        setattr(server.settings, field, value)
    publish(server, 1)
    yield server
    server.close()


@pytest.fixture(scope="module")
def devices(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three running agents on digits@1 (group ``lab``, polling every second) and one silent device."""
    token = fleet.enroll_token()
    ids, state_dirs = [], []
    for _ in range(4):
        state_dir = tmp_path_factory.mktemp("agent")
        done = agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", token)
        assert done.returncode == 0, done.stderr
        ids.append(_device_id(fleet, state_dir))
        state_dirs.append(state_dir)
    _group(fleet, "lab", ids[:3])
    _group(fleet, "quiet", ids[3:])
    for device_id in ids[:3]:
        _assign(fleet, device_id, 1)
    runners = [start_daemon(d, telemetry_upload_interval_s=1) for d in state_dirs[:3]]
    daemons = [next(r) for r in runners]
    for daemon in daemons:
        daemon.wait_ready("digits", timeout_s=60)
    apps = [App(d) for d in daemons]
    # An agent's first telemetry window keeps its default length (60 s, aligned to the minute) even after
    # the server asks for 1 s windows: wait until every agent reports short windows before rolling out.
    wait_until(lambda: _short_windows(fleet, ids[:3]), timeout_s=90)
    yield {"ids": ids, "daemons": daemons, "apps": apps, "silent": ids[3]}
    for app in apps:
        app.stop.set()
    for runner in runners:
        for _ in runner:  # finish the generator: stops the daemon
            pass


def _short_windows(fleet: Fleet, ids: list[str]) -> bool:
    with fleet.app.state.session_factory() as session:
        rows = session.execute(select(MetricWindow.device_id, MetricWindow.window_start, MetricWindow.window_end))
        short = {d for d, start, end in rows if (end - start).total_seconds() <= 2}
    return set(ids) <= short


def _device_id(fleet: Fleet, state_dir: Any) -> str:
    import json

    return str(json.loads((state_dir / "identity" / "enrollment.json").read_text())["device_id"])


def _group(fleet: Fleet, name: str, ids: list[str]) -> None:
    with session_scope(fleet.app.state.session_factory) as session:
        group = DeviceGroup(name=name, poll_interval_s=1)
        session.add(group)
        session.flush()
        for device_id in ids:
            assert session.get(Device, device_id) is not None
            session.add(DeviceGroupMember(group_id=group.id, device_id=device_id))


def _assign(fleet: Fleet, device_id: str, version: int) -> None:
    body = {"device_id": device_id, "model_name": "digits", "bundle_version": version, "pinned": False}
    answer = fleet.http.put("/api/v1/admin/assignments", headers=fleet.admin, json=body)
    assert answer.status_code == 200, answer.text


def create(fleet: Fleet, bundle: str, targets: list[str], waves: str, gates: list[str], timeout: str = "30s") -> int:
    body = {"bundle": bundle, "targets": targets, "waves": waves, "gates": gates, "soak": "2s",
            "device_timeout": timeout, "jitter": "0s"}  # fmt: skip
    answer = fleet.http.post(ROLLOUTS, json=body, headers=fleet.admin)
    assert answer.status_code == 201, answer.text
    return int(answer.json()["id"])


def drive(fleet: Fleet, rollout_id: int, timeout_s: float = 150.0) -> dict[str, Any]:
    """Tick the engine through the API until the rollout stops running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = fleet.http.post(f"{ROLLOUTS}/{rollout_id}/evaluate", headers=fleet.admin).json()
        if view["state"] != "running":
            return dict(view)
        time.sleep(0.5)
    raise AssertionError(f"rollout {rollout_id} still running after {timeout_s} s: {view['waves']}")


def served_versions(apps: list[App], since: list[int]) -> list[set[str]]:
    return [set(app.versions[n:]) for app, n in zip(apps, since, strict=True)]


def wait_until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_1_good_bundle_goes_through_every_wave(fleet: Fleet, devices: dict[str, Any]) -> None:
    publish(fleet, 2)
    rollout_id = create(fleet, "digits@2", ["group:lab"], "1,2,100%", GATES)
    view = drive(fleet, rollout_id)
    assert view["state"] == "completed", [(d["action"], d["reason"]) for d in view["decisions"]]
    assert [d["action"] for d in view["decisions"]] == ["create", "start", "advance", "advance", "complete"]
    assert [w["outcomes"] for w in view["waves"]] == [{"healthy": 1}, {"healthy": 1}, {"healthy": 1}]
    gates = {g["gate"]: g for g in view["decisions"][2]["record"]["gates"]}
    assert gates["psi<0.2 min=100"]["status"] == "pass" and gates["psi<0.2 min=100"]["sample"] >= 100
    marks = [len(a.versions) for a in devices["apps"]]
    wait_until(lambda: all("2" in v for v in served_versions(devices["apps"], marks)))


def test_2_drifting_bundle_stops_at_the_first_wave_and_is_rolled_back(fleet: Fleet, devices: dict[str, Any]) -> None:
    publish(fleet, 3, drifting=True)
    rollout_id = create(fleet, "digits@3", ["group:lab"], "1,100%", GATES)
    view = drive(fleet, rollout_id)
    assert view["state"] == "rolled_back", view["decisions"]
    rollback = view["decisions"][-1]
    assert rollback["actor"] == "engine" and rollback["wave"] == 1 and "psi=" in rollback["reason"]
    failed = [g for g in rollback["record"]["gates"] if g["status"] == "fail"]
    assert [g["gate"] for g in failed] == ["psi<0.2 min=100"] and failed[0]["value"] > 1.0
    assert rollback["record"]["restore"]["restored"] == 1
    marks = [len(a.versions) for a in devices["apps"]]
    wait_until(lambda: all(v == {"2"} for v in served_versions(devices["apps"], marks) if v))


def test_3_bundle_failing_on_live_inputs_stops_at_the_first_wave(fleet: Fleet, devices: dict[str, Any]) -> None:
    publish(fleet, 4, fixed_batch=True)
    rollout_id = create(fleet, "digits@4", ["group:lab"], "1,100%", GATES)
    view = drive(fleet, rollout_id)
    assert view["state"] == "rolled_back", view["decisions"]
    rollback = view["decisions"][-1]
    failed = {g["gate"]: g for g in rollback["record"]["gates"] if g["status"] == "fail"}
    assert failed, rollback
    assert set(failed) <= {"fallback_rate<0.05 min=50", "error_rate<0.01 min=50", "install_success>=0.95"}
    assert rollback["wave"] == 1 and [w["state"] for w in view["waves"]] == ["failed", "cancelled"]


def test_4_a_device_that_never_reports_times_out(fleet: Fleet, devices: dict[str, Any]) -> None:
    rollout_id = create(fleet, "digits@2", [f"device:{devices['silent']}"], "100%", ["error_rate<0.01"], "3s")
    view = drive(fleet, rollout_id, timeout_s=30)
    assert view["state"] == "rolled_back"
    assert view["waves"][0]["outcomes"] == {"timed_out": 1}
    assert "1 timed out of 1 devices" in view["decisions"][-1]["reason"]
