"""Self-healing start-up, in process: the fallback chain answers while a lost bundle comes back.

The damage matrix against real agent processes is ``tests/e2e/test_agent_self_healing.py``; here
the same start-up is driven step by step so the in-between states can be checked: the cloud answers
while nothing local verifies, readiness and status say why, and the next round downloads the bundle
again and serves it locally.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bundles.manifest import Manifest
from bundles.predictor import Predictor
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.daemon import Daemon
from device_agent.httpapi import AgentHttpServer
from device_agent.statefiles import StateFiles
from tests.device_agent.helpers import VARIANT, DirectorySource, entry, publish_bundle
from tests.device_agent.telemetry.oip_server import OipServer

X = {"x": np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)}


def installed_device(tmp_path: Path) -> tuple[Path, Path]:
    """A device state dir with tiny@1 committed (one slot only) and the published targets."""
    targets = tmp_path / "targets"
    publish_bundle(targets, tmp_path / "work", "tiny", 1)
    agent = Agent.from_config(environ={}, state_dir=tmp_path / "device", min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(targets, tmp_path / "device" / "cache"))
    agent.updater.apply({"models": [entry("tiny", 1)]})
    agent.close()
    return tmp_path / "device", targets


def device_with_two_versions(tmp_path: Path) -> Path:
    """A device state dir where slot a holds tiny@1 (previous) and slot b tiny@2 (committed)."""
    targets = tmp_path / "targets"
    for version in (1, 2):
        publish_bundle(targets, tmp_path / "work", "tiny", version)
    agent = Agent.from_config(environ={}, state_dir=tmp_path / "device", min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(targets, tmp_path / "device" / "cache"))
    for version in (1, 2):
        agent.updater.apply({"models": [entry("tiny", version)]})
    agent.close()
    return tmp_path / "device"


def test_requests_during_start_up_wait_for_the_slot_that_verifies_and_none_gets_a_503(tmp_path: Path) -> None:
    """The daemon serves HTTP before start-up verifies the slots: what comes meanwhile waits, then slot a answers.

    Slot b (committed v2) is zeroed, slot a (v1) is good. Requests sent before start-up has verified
    anything used to find no model loaded and go down the fallback chain: 503 "local model not_ready"
    (here the fleet runs no inference endpoint), although v1 was about to be served.
    """
    state_dir = device_with_two_versions(tmp_path)
    slot_b = state_dir / "models" / "tiny" / "slot_b"
    model_file = slot_b / Manifest.from_bytes((slot_b / "manifest.json").read_bytes()).variant(VARIANT).files[0].path
    model_file.write_bytes(bytes(model_file.stat().st_size))
    agent = Agent.build(load_config(environ={}, state_dir=state_dir), follow_pointers=False, telemetry=False)
    agent.updater.expect_recovery()  # as `edgefleet-agent run` (Daemon.run): start-up announced, HTTP, then recover
    server = AgentHttpServer(agent, "127.0.0.1", 0).start()
    answers: list[tuple[float, int, dict[str, Any]]] = []
    waiting: list[float] = []  # requests that reached the agent and wait for start-up
    wait_recovered = agent.updater.wait_recovered

    def counted_wait(timeout_s: float) -> bool:
        waiting.append(time.monotonic())
        return wait_recovered(timeout_s)

    agent.updater.wait_recovered = counted_wait  # type: ignore[method-assign]
    stop = threading.Event()

    def hammer() -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                answer = client.post(f"{server.url}/v2/models/tiny/infer", json=body)
                answers.append((sent, answer.status_code, answer.json()))

    clients = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        from_python: list[Any] = []
        app = threading.Thread(target=lambda: from_python.append(agent.predict(X, model="tiny")))
        app.start()
        deadline = time.monotonic() + 20
        while len(waiting) < len(clients) + 1 and time.monotonic() < deadline:  # every client and the app
            time.sleep(0.01)
        recover_began = time.monotonic()
        agent.updater.recover()
        while len(answers) < 4 * len(clients) and time.monotonic() < deadline:  # and some after start-up
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in [*clients, app]:
            thread.join(timeout=30)
        server.stop()
        agent.close()
    assert len(waiting) >= len(clients) + 1, "the requests never reached the agent during start-up"
    assert sum(sent < recover_began for sent, _, _ in answers) >= len(clients), "no request came during start-up"
    assert {status for _, status, _ in answers} == {200}, [a for _, s, a in answers if s != 200][:3]
    assert {(a["model_version"], a["parameters"]["source"]) for _, _, a in answers} == {("1", "local")}
    assert (from_python[0].source, from_python[0].version) == ("local", 1)


def test_a_lost_bundle_is_answered_by_the_cloud_then_downloaded_again(tmp_path: Path) -> None:
    state_dir, targets = installed_device(tmp_path)
    slot = state_dir / "models" / "tiny" / "slot_a"
    manifest = Manifest.from_bytes((slot / "manifest.json").read_bytes())
    with Predictor.load(manifest, slot, variant=VARIANT) as cloud_model, OipServer({"tiny": cloud_model}) as cloud:
        desired = {"models": [entry("tiny", 1)], "fallback": {"url": cloud.url, "model": "tiny"}}
        (state_dir / "desired.json").write_text(json.dumps({"state": desired, "etag": '"1"'}))
        model_file = slot / manifest.variant(VARIANT).files[0].path
        model_file.write_bytes(bytes(model_file.stat().st_size))  # zeroed flash

        agent = Agent.from_config(environ={}, state_dir=state_dir, min_free_disk_bytes=0, health_runs=2)
        daemon = Daemon(agent)
        agent.updater.recover()
        daemon._follow_desired_sections()  # what `run` does before its first poll
        try:
            answer = agent.predict(X, model="tiny")
            assert answer.source == "cloud" and cloud.requests == 1
            assert agent.health() == "no-model"
            assert "failed verification" in agent.readiness()["tiny"]["problem"]
            assert [r.file for r in agent.files.repairs] == ["models/tiny/slot_a"]
            assert "tiny" in agent.updater.redownload

            agent.updater.set_source(DirectorySource(targets, state_dir / "cache2"))
            daemon.apply()  # the next round: the same target, fetched and verified again
            again = agent.predict(X, model="tiny")
            assert again.source == "local" and again.version == 1
            assert agent.health() == "ok" and not agent.updater.redownload
        finally:
            agent.close()


def test_status_without_a_daemon_reports_damage_but_changes_nothing_on_disk(tmp_path: Path) -> None:
    state_dir, _ = installed_device(tmp_path)
    pointer = state_dir / "models" / "tiny" / "pointer.json"
    pointer.write_text("{not json")
    config = load_config(environ={}, state_dir=state_dir)
    agent = Agent.build(config, follow_pointers=True, telemetry=False, read_only=True)
    try:
        assert agent.health() == "ok"  # rebuilt in memory from the slot that verifies
        assert [r.file for r in agent.files.repairs] == ["models/tiny/pointer.json"]
        assert pointer.read_text() == "{not json" and not (state_dir / "quarantine").exists()
    finally:
        agent.close()


def test_the_loader_never_raises_for_what_it_reads(tmp_path: Path) -> None:
    """Whatever bytes a state file holds, the loader returns the model, the default or the rebuilt value."""
    from bundles.contract import LastUpdate

    files = StateFiles(tmp_path)
    rng = np.random.default_rng(1)
    samples = [b"", b"null", b"[]", b'{"model": 5}', b"\xff\xfe", b"1e999", b'{"model":"m","version":-1,"status":"x"}',
               b"[" * 100_000, rng.bytes(1000), b'{"model":"m","version":1,"status":"ok","history":"x"}']  # fmt: skip
    for i, raw in enumerate(samples):
        path = tmp_path / f"f{i}.json"
        path.write_bytes(raw)
        assert files.load(path, LastUpdate, "default") == "default", raw[:40]
    assert len(files.repairs) == len(samples)
    assert len(list((tmp_path / "quarantine").iterdir())) == len(samples)
