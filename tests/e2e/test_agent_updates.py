"""End to end: the real fleet server on loopback, real agent processes, real TUF, real ONNX Runtime.

One server for the module; the device goes through the stories in order: enroll, a good bundle
installs and serves, a bundle whose golden outputs fail is rolled back and reported, a tampered
target is refused while the old model keeps serving, and a download cut mid-way resumes with a Range
request instead of starting over.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.device_agent.e2e_support import Fleet, agent_cli, start_daemon
from tests.device_agent.helpers import assert_one_committed_loadable


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = Fleet(tmp_path_factory.mktemp("fleet"))
    server.publish("tiny", 1)
    yield server
    server.close()


@pytest.fixture(scope="module")
def device(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    state_dir = tmp_path_factory.mktemp("device")
    done = agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token())
    assert done.returncode == 0, done.stderr
    enrollment = json.loads((state_dir / "identity" / "enrollment.json").read_text())
    assert (state_dir / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
    return {"state_dir": state_dir, "device_id": enrollment["device_id"]}


def update_round(device: dict[str, Any]) -> dict[str, Any]:
    """One `edgefleet-agent run --once` process, then `status --json` from another process."""
    done = agent_cli(device["state_dir"], "run", "--once", "--no-http")
    assert done.returncode == 0, done.stderr
    status = agent_cli(device["state_dir"], "status", "--json", http_port=1)
    return dict(json.loads(status.stdout))


def infer(url: str) -> dict[str, Any]:
    x = np.zeros((1, 4), dtype=np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    answer = httpx.post(f"{url}/v2/models/tiny/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_1_good_bundle_installs_and_serves(fleet: Fleet, device: dict[str, Any]) -> None:
    fleet.assign(device["device_id"], "tiny", 1)
    status = update_round(device)
    assert status["last_update"]["status"] == "installed" and status["last_update"]["version"] == 1
    assert assert_one_committed_loadable(device["state_dir"], "tiny") == 1
    events = fleet.install_events(device["device_id"])
    assert [(e["to_version"], e["result"]) for e in events] == [(1, "installed")]
    seen = fleet.http.get(f"/api/v1/admin/devices/{device['device_id']}", headers=fleet.admin).json()
    assert [(i["name"], i["version"], i["state"]) for i in seen["installed"]] == [("tiny", 1, "active")]
    assert seen["capabilities"]["runtimes"].get("onnxruntime"), seen["capabilities"]
    for daemon in start_daemon(device["state_dir"]):
        daemon.wait_ready("tiny")
        answer = infer(daemon.url)
        assert answer["model_version"] == "1" and answer["parameters"]["source"] == "local"
        port = daemon.url.rsplit(":", 1)[1]
        live = json.loads(agent_cli(device["state_dir"], "status", "--json", http_port=port).stdout)
        assert live["daemon"] == "running" and live["queue"]["completed"] >= 1


def test_2_bundle_failing_its_golden_check_is_rolled_back_and_reported(fleet: Fleet, device: dict[str, Any]) -> None:
    fleet.publish("tiny", 2, bad_golden=True)
    fleet.assign(device["device_id"], "tiny", 2)
    status = update_round(device)
    assert status["last_update"]["status"] == "rolled-back", status["last_update"]
    assert "self-test" in status["last_update"]["error"] or "golden" in status["last_update"]["error"]
    assert assert_one_committed_loadable(device["state_dir"], "tiny") == 1
    reported = [e for e in fleet.install_events(device["device_id"]) if e["to_version"] == 2]
    assert len(reported) == 1 and reported[0]["result"] == "rolled_back" and reported[0]["reason"]
    again = update_round(device)  # the same desired state: not downloaded and rolled back again
    assert again["last_update"]["deployment_id"] == status["last_update"]["deployment_id"]


def test_3_tampered_target_is_refused_and_the_old_model_keeps_serving(fleet: Fleet, device: dict[str, Any]) -> None:
    fleet.publish("tiny", 3)
    stored = fleet.stored_target("tiny/3/onnx-fp32.tar.gz")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    for daemon in start_daemon(device["state_dir"]):
        daemon.wait_ready("tiny")
        fleet.assign(device["device_id"], "tiny", 3)
        status = update_round(device)
        assert status["last_update"]["status"] == "failed"
        assert "hash" in status["last_update"]["error"].lower() or "sha256" in status["last_update"]["error"].lower()
        assert infer(daemon.url)["model_version"] == "1"
    assert assert_one_committed_loadable(device["state_dir"], "tiny") == 1


def test_4_download_cut_midway_resumes_without_starting_over(fleet: Fleet, device: dict[str, Any]) -> None:
    from bundles.tuf.testing import FileServer

    fleet.publish("tiny", 4)
    target = fleet.stored_target("tiny/4/onnx-fp32.tar.gz")
    size = target.stat().st_size
    enrollment_path = device["state_dir"] / "identity" / "enrollment.json"
    original = enrollment_path.read_text()
    with FileServer.for_repository(fleet.settings.tuf_dir) as mirror:  # a flaky mirror of the same repository
        mirror.cut_after(target.name, size // 2)
        enrollment = json.loads(original)
        enrollment["targets_url"] = mirror.url("/tuf/targets/")
        enrollment_path.write_text(json.dumps(enrollment))
        fleet.assign(device["device_id"], "tiny", 4)
        try:
            status = update_round(device)
        finally:
            enrollment_path.write_text(original)
        requests = mirror.requests_for(target.name)
    assert status["last_update"]["status"] == "installed", status["last_update"]
    assert len(requests) == 2, requests
    assert requests[1].range == f"bytes={size // 2}-"
    assert sum(r.bytes_sent for r in requests) == size, "the download started over"
    assert assert_one_committed_loadable(device["state_dir"], "tiny") == 4


def test_5_a_running_daemon_updates_live_without_failing_a_request(fleet: Fleet, device: dict[str, Any]) -> None:
    import signal
    import threading
    import time

    fleet.publish("tiny", 5)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()
    for daemon in start_daemon(device["state_dir"]):
        daemon.wait_ready("tiny")
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}

        def hammer(url: str, body: dict[str, Any]) -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not stop.is_set():
                    response = http.post("/v2/models/tiny/infer", json=body)
                    version = response.json().get("model_version") if response.status_code == 200 else None
                    answers.append((response.status_code, version))

        worker = threading.Thread(target=hammer, args=(daemon.url, body))
        worker.start()
        try:
            fleet.assign(device["device_id"], "tiny", 5)
            daemon.process.send_signal(signal.SIGHUP)  # poll now (systemctl reload)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(v == "5" for _, v in answers[-50:]):
                time.sleep(0.05)
            time.sleep(0.2)  # a few more requests on the new version
        finally:
            stop.set()
            worker.join()
    statuses = {code for code, _ in answers}
    versions = [v for _, v in answers]
    assert statuses == {200}, f"requests failed during the update: {collections.Counter(statuses)}"
    assert "5" in versions and set(versions) <= {"4", "5"} and len(versions) > 20
    assert versions.index("5") > 0 and "4" not in versions[versions.index("5") :], (
        "served an old version after the swap"
    )
    assert assert_one_committed_loadable(device["state_dir"], "tiny") == 5
