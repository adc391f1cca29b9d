"""A device with only LiteRT installs and serves the TFLite variant through a real rollout.

The digits CNN converted once to ONNX, TFLite and Core ML (``digits_all_targets``) is published with
the release workstation's own command (``edgefleet-convert publish --server``) to the fleet server on
loopback. Two real agent processes run: one allowed only LiteRT (``EDGEFLEET_AGENT_RUNTIMES=litert``,
as on a board without ONNX Runtime), one only ONNX Runtime. One rollout to both, gated per variant:
the server directs each to a variant validated on its runtime (never a Core ML one), each installs it
through TUF, passes its golden self-test and answers real digits; the LiteRT device reports the
TFLite variant and the runtime it runs on in its inventory and install event; the wave's figures and
the telemetry summary are split by variant.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from fleet_server.models import Device
from tests.conftest import ConvertedDigits
from tests.converter.helpers import ok
from tests.device_agent.e2e_support import Daemon, Fleet, agent_cli, start_daemon
from tests.e2e.test_rollout_real_agents import _device_id, _group, create, drive, wait_until


class DigitsApp:
    """An application on the device: real digits, 2 rows per request, answers kept."""

    def __init__(self, daemon: Daemon, images: np.ndarray, labels: np.ndarray) -> None:
        self.url, self.images, self.labels = daemon.url, images, labels
        self.stop, self.correct, self.answered = threading.Event(), 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        index = 0
        with httpx.Client(timeout=5) as http:
            while not self.stop.is_set():
                rows = np.arange(index, index + 2) % len(self.images)
                index += 2
                body = {"inputs": [{"name": "x", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                    "data": self.images[rows].ravel().tolist()}]}  # fmt: skip
                try:
                    answer = http.post(f"{self.url}/v2/models/digits/infer", json=body)
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if answer.status_code == 200:
                    logits = next(o for o in answer.json()["outputs"] if o["name"] == "logits")
                    predicted = np.asarray(logits["data"]).reshape(2, 10).argmax(axis=1)
                    self.correct += int(np.sum(predicted == self.labels[rows]))
                    self.answered += 2
                else:
                    time.sleep(0.05)
                time.sleep(0.005)


@pytest.fixture(scope="module")
def fleet(digits_all_targets: ConvertedDigits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The fleet server, with digits@1 published by the release workstation's ``publish --server``."""
    server = Fleet(tmp_path_factory.mktemp("tflite-fleet"), install_root=False)
    for field, value in (("telemetry_window_s", 1), ("telemetry_upload_interval_s", 1)):
        setattr(server.settings, field, value)
    home = tmp_path_factory.mktemp("release-home") / "home"
    shutil.copytree(digits_all_targets.home, home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(home))
        ok("keys", "init")
        ok("publish", "digits", "--server", server.url, "--api-key", server.admin_key, "--yes")
    yield server
    server.close()


def test_a_device_with_only_litert_installs_and_serves_the_tflite_variant_through_a_rollout(
    fleet: Fleet, digits_all_targets: ConvertedDigits, tmp_path_factory: pytest.TempPathFactory
) -> None:
    token = fleet.enroll_token()
    dirs = {runtime: tmp_path_factory.mktemp(f"agent-{runtime}") for runtime in ("litert", "onnxruntime")}
    for runtime, state_dir in dirs.items():
        done = agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", token, runtimes=runtime)
        assert done.returncode == 0, done.stderr
    ids = {runtime: _device_id(fleet, state_dir) for runtime, state_dir in dirs.items()}
    _group(fleet, "boards", list(ids.values()))
    runners = [start_daemon(d, runtimes=r, telemetry_upload_interval_s=1) for r, d in dirs.items()]
    daemons = dict(zip(dirs, (next(r) for r in runners), strict=True))
    try:
        _roll_out_and_check(fleet, digits_all_targets, ids, daemons)
    finally:
        for runner in runners:
            for _ in runner:  # finish the generator: stops the daemon
                pass


def _roll_out_and_check(fleet: Fleet, digits: ConvertedDigits, ids: dict[str, str], daemons: dict[str, Daemon]) -> None:
    rollout_id = create(fleet, "digits@1", ["group:boards"], "100%", ["error_rate<0.01 min=20 per=variant"])
    apps = {r: DigitsApp(d, digits.cnn.eval_x, digits.cnn.eval_y) for r, d in daemons.items()}  # ask until served
    try:
        view = drive(fleet, rollout_id, timeout_s=150)
        wait_until(lambda: all(app.answered >= 200 for app in apps.values()), timeout_s=60)
    finally:
        for app in apps.values():
            app.stop.set()
    assert view["state"] == "completed", [(d["action"], d["reason"]) for d in view["decisions"]]
    detail = fleet.http.get(f"/api/v1/admin/rollouts/{rollout_id}", params={"devices": True}, headers=fleet.admin)
    variants = {d["device_id"]: d["variant"] for d in detail.json()["device_detail"]}
    lite_variant, onnx_variant = variants[ids["litert"]], variants[ids["onnxruntime"]]
    assert lite_variant.startswith("tflite-") and onnx_variant.startswith("onnx-")
    wave = view["waves"][0]
    assert set(wave["by_variant"]) == {lite_variant, onnx_variant}
    assert all(figures["requests"] > 0 for figures in wave["by_variant"].values())
    gate = next(g for g in wave["gates"] if g["gate"] == "error_rate<0.01 min=20 per=variant")
    assert gate["status"] == "pass" and lite_variant in gate["reason"] and onnx_variant in gate["reason"]
    accuracy = {r: app.correct / app.answered for r, app in apps.items()}
    assert accuracy["litert"] > 0.9 and accuracy["onnxruntime"] > 0.9, accuracy
    _check_what_the_litert_device_reports(fleet, ids["litert"], lite_variant, daemons["litert"])
    summary = fleet.http.get("/api/v1/admin/telemetry/summary",
                             params={"model": "digits", "by": "variant", "since": "2020-01-01T00:00:00Z"},
                             headers=fleet.admin)  # fmt: skip
    assert summary.status_code == 200, summary.text
    by_variant = {row["variant"]: row for row in summary.json() if row["version"] == 1}
    assert set(by_variant) == {lite_variant, onnx_variant}  # (version 0: requests before anything was installed)
    assert by_variant[lite_variant]["devices_reporting"] == 1 and by_variant[lite_variant]["requests"] > 0
    _check_the_dashboard_splits_the_wave_by_variant(fleet, rollout_id, [lite_variant, onnx_variant])


def _check_the_dashboard_splits_the_wave_by_variant(fleet: Fleet, rollout_id: int, variants: list[str]) -> None:
    with httpx.Client(base_url=fleet.url, timeout=30) as browser:
        form = browser.get("/ui/login").text
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', form)
        assert csrf is not None
        login = browser.post("/ui/login", data={"csrf_token": csrf.group(1), "api_key": fleet.admin_key, "next": "/"})
        assert login.status_code == 303, login.text
        page = browser.get(f"/ui/rollouts/{rollout_id}")
    assert page.status_code == 200, page.text
    table = page.text.split('data-testid="by-variant-1"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">1 \(1\)</td>\s*<td class=\"num\">([0-9,]+)</td>", table)
    assert sorted(variant for variant, _ in rows) == sorted(variants), table
    assert all(int(requests.replace(",", "")) > 0 for _, requests in rows), table


def _check_what_the_litert_device_reports(fleet: Fleet, device_id: str, variant: str, daemon: Daemon) -> None:
    from importlib import metadata

    litert = metadata.version("ai-edge-litert")
    installed = [e for e in fleet.install_events(device_id) if e.get("result") == "installed"]
    assert installed and installed[-1]["variant"] == variant
    assert (installed[-1]["runtime"], installed[-1]["runtime_version"]) == ("litert", litert)
    wait_until(lambda: _inventory(fleet, device_id).get("installed"), timeout_s=30)
    inventory = _inventory(fleet, device_id)
    assert inventory["capabilities"]["runtimes"] == {"litert": litert}  # ONNX Runtime is not offered
    active = next(line for line in inventory["installed"] if line["state"] == "active")
    assert (active["variant"], active["runtime"], active["runtime_version"]) == (variant, "litert", litert)
    status = httpx.get(f"{daemon.url}/v2/models/digits", timeout=5)
    assert status.status_code == 200, status.text


def _inventory(fleet: Fleet, device_id: str) -> dict[str, Any]:
    with fleet.app.state.session_factory() as session:
        device = session.scalar(select(Device).where(Device.id == device_id))
        assert device is not None
        return {"capabilities": device.capabilities, "installed": json.loads(json.dumps(device.installed or []))}
