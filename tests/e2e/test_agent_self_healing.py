"""The damage matrix: a real agent process restarted on a damaged state directory serves, and says what it repaired.

One real fleet server and one real device that installed tiny@1 then tiny@2 (slot a holds v1 as
``previous``, slot b holds v2, committed). Each case copies that device's state directory, damages
one file (truncated, garbage, deleted, wrong JSON type; a model file bit-flipped, zeroed, deleted;
the TUF metadata; the telemetry database), starts ``edgefleet-agent run`` on it as a fresh process,
and checks that it answers inferences within a bounded time with the version it should, that
``/edgefleet/status`` lists the repair naming the file, and that ``/v2/health/ready`` agrees.

To keep ~45 restarts cheap each agent process is forked from a "zygote" that imported everything once
(imports cost ~1 s, a fork a few ms); each case is still a separate process with its own memory that
reads the damaged directory from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.device_agent.e2e_support import REPO_ROOT, Fleet, agent_cli, agent_env, free_port

SERVE_WITHIN_S = 30.0

ZYGOTE = r"""
import json, os, sys
import numpy, onnxruntime, httpx, tuf.ngclient  # noqa: F401  (imported once, before any fork)
from device_agent import cli, agent, daemon, updater, httpapi  # noqa: F401
from bundles.tuf import client  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(request["env"])
        os._exit(cli.main(["run", "--port", str(request["port"])]))
    print(f"pid {pid}", flush=True)
"""


class Zygote:
    """A pre-imported Python that forks ``edgefleet-agent run`` processes on demand."""

    def __init__(self, log_path: Path) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": self.log}
        env = agent_env(log_path.parent)
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], **pipes, text=True, cwd=REPO_ROOT, env=env)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def start(self, state_dir: Path, port: int) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        env = {"EDGEFLEET_AGENT_STATE_DIR": str(state_dir), "EDGEFLEET_AGENT_POLL_INTERVAL_S": "2"}
        self.process.stdin.write(json.dumps({"env": env, "port": port}) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline().split()[1])

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = Fleet(tmp_path_factory.mktemp("fleet"))
    server.publish("tiny", 1)
    server.publish("tiny", 2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def device(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A device that installed tiny@1 then tiny@2: its state dir is the pristine copy every case damages."""
    state_dir = tmp_path_factory.mktemp("pristine")
    assert agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token()).returncode == 0
    device_id = json.loads((state_dir / "identity" / "enrollment.json").read_text())["device_id"]
    for version in (1, 2):
        fleet.assign(device_id, "tiny", version)
        done = agent_cli(state_dir, "run", "--once", "--no-http")
        assert done.returncode == 0, done.stderr
    pointer = json.loads((state_dir / "models" / "tiny" / "pointer.json").read_text())
    assert pointer == {"active": "b", "committed": "b", "previous": "a"}
    return {"state_dir": state_dir, "device_id": device_id}


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("zygote") / "agents.log")
    yield z
    z.close()


# --- the damage ----------------------------------------------------------------------------------


def truncated(path: Path) -> None:
    data = path.read_bytes() if path.exists() else b'{"state": {"models": [{"name": "tiny", "vers'
    path.write_bytes(data[: max(1, len(data) // 2)])


def garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(7).bytes(300))


def deleted(path: Path) -> None:
    path.unlink(missing_ok=True)


def wrong_type(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[{"active": 7, "version": "two"}]')


def bit_flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


STATE_FILES = {
    "pointer": "models/tiny/pointer.json",
    "marker": "models/tiny/slot_b/slot.json",
    "deployment": "deployment.json",
    "desired": "desired.json",
    "failed": "failed.json",
    "last_update": "last_update.json",
    "enrollment": "identity/enrollment.json",
    "tuf_root": "tuf/metadata/root.json",
    "tuf_timestamp": "tuf/metadata/timestamp.json",
}
DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncated, "garbage": garbage, "deleted": deleted, "wrong_type": wrong_type,
}  # fmt: skip
ABSENT_IS_FINE = {"deployment", "desired", "failed", "last_update", "tuf_root", "tuf_timestamp", "enrollment"}
"""Files whose absence is a normal state (no deployment running, not enrolled...): deleting them is no repair."""
NOT_OURS = {"tuf_timestamp"}
"""Read by python-tuf, which ignores a damaged non-root file and fetches it again: nothing to report."""


def model_file(state_dir: Path, slot: str = "b") -> Path:
    manifest = json.loads((state_dir / "models" / "tiny" / f"slot_{slot}" / "manifest.json").read_text())
    return state_dir / "models" / "tiny" / f"slot_{slot}" / manifest["variants"][0]["files"][0]["path"]


# --- running a case -----------------------------------------------------------------------------


def restarted(
    device: dict[str, Any],
    zygote: Zygote,
    tmp_path: Path,
    damage: Callable[[Path], None],
    before_stop: Callable[[dict[str, Any]], None] = lambda status: None,
) -> dict[str, Any]:
    """Copy the pristine device, damage it, start a fresh agent process, wait until it serves; its status."""
    state_dir = tmp_path / "device"
    shutil.copytree(device["state_dir"], state_dir)
    damage(state_dir)
    port = free_port()
    pid = zygote.start(state_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        answer = _first_answer(url)
        status = _status_once_settled(url)
        ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
        before_stop(status)
    finally:
        os.kill(pid, signal.SIGTERM)
        _reap(pid)
    return {"answer": answer, "status": status, "ready": ready, "state_dir": state_dir}


def _first_answer(url: str) -> dict[str, Any]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    deadline = time.monotonic() + SERVE_WITHIN_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(f"{url}/v2/models/tiny/infer", json=body, timeout=5)
            if answer.status_code == 200 and answer.json()["parameters"]["source"] == "local":
                return dict(answer.json())
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.1)
    raise AssertionError(f"the agent did not serve tiny locally within {SERVE_WITHIN_S} s: {last}")


def _status_once_settled(url: str) -> dict[str, Any]:
    """The status after start-up's first round began (TUF is healed when the daemon connects, after it serves)."""
    deadline = time.monotonic() + SERVE_WITHIN_S
    while True:
        status = dict(httpx.get(f"{url}/edgefleet/status", timeout=5).json())
        not_enrolled = status.get("enrollment_status") is None  # (a damaged enrollment: no rounds to wait for)
        if status.get("last_round_at") is not None or not_enrolled or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # the zygote's child: the zygote reaps it
            done = pid if not _alive(pid) else 0
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def repaired_files(status: dict[str, Any]) -> list[str]:
    return [r["file"] for r in status["repairs"]]


def served_from_a_or_healed(result: dict[str, Any]) -> None:
    """Answered locally by slot a's verified v1, or by v2 when its download through TUF beat the first request.

    Requests that come during start-up wait for the slots to be verified and are answered by slot a
    (``test_no_request_gets_a_503_while_the_committed_slot_is_repaired``), but this case's first
    request can come after the whole repair (the client retries its connection every 0.1 s, and the
    re-download takes a fraction of a second on an idle host): either way a verified version answered
    locally, never the damaged one.
    """
    version = result["answer"]["model_version"]
    assert version in ("1", "2"), result["answer"]
    if version == "2":
        assert (result["status"]["last_update"] or {}).get("status") == "installed", result["status"]["last_update"]


# --- the matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage_name", sorted(DAMAGES))
@pytest.mark.parametrize("file_key", sorted(STATE_FILES))
def test_a_damaged_state_file_is_set_aside_and_the_agent_serves(
    device: dict[str, Any], zygote: Zygote, tmp_path: Path, file_key: str, damage_name: str
) -> None:
    relative = STATE_FILES[file_key]
    result = restarted(device, zygote, tmp_path, lambda d: DAMAGES[damage_name](d / relative))
    assert result["answer"]["model_version"] == "2", result["answer"]  # the committed version, not an older one
    assert result["ready"].status_code == 200, result["ready"].text
    if file_key in NOT_OURS or (damage_name == "deleted" and file_key in ABSENT_IS_FINE):
        return
    assert relative in repaired_files(result["status"]), result["status"]["repairs"]
    repair = next(r for r in result["status"]["repairs"] if r["file"] == relative)
    if repair["quarantined_as"] is not None:  # set aside, never deleted: an engineer can look at it
        assert (result["state_dir"] / repair["quarantined_as"]).exists()


@pytest.mark.parametrize("damage", [bit_flipped, zeroed, deleted], ids=lambda f: f.__name__)
def test_a_damaged_committed_model_falls_back_to_the_other_verified_slot(
    device: dict[str, Any], zygote: Zygote, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    result = restarted(device, zygote, tmp_path, lambda d: damage(model_file(d)))
    served_from_a_or_healed(result)
    repair = next(r for r in result["status"]["repairs"] if r["file"] == "models/tiny/slot_b")
    assert "serving v1 from slot a" in repair["action"]


@pytest.mark.parametrize("damage", [zeroed, garbage], ids=lambda f: f.__name__)
def test_no_request_gets_a_503_while_the_committed_slot_is_repaired(
    device: dict[str, Any], zygote: Zygote, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """Clients hammer the agent from its first instant: every answer is local, v1 from slot a until v2 is back."""
    state_dir = tmp_path / "device"
    shutil.copytree(device["state_dir"], state_dir)
    damage(model_file(state_dir) if damage is zeroed else state_dir / "models/tiny/slot_b/manifest.json")
    port = free_port()
    pid = zygote.start(state_dir, port)
    try:
        answers = _hammered(f"http://127.0.0.1:{port}", clients=4)
    finally:
        os.kill(pid, signal.SIGTERM)
        _reap(pid)
    assert answers, "the agent never answered"
    refused = [(status, answer) for status, answer in answers if status != 200]
    assert not refused, f"{len(refused)} of {len(answers)} requests refused, e.g. {refused[:2]}"
    assert {a["parameters"]["source"] for _, a in answers} == {"local"}
    assert {a["model_version"] for _, a in answers} <= {"1", "2"}


def _hammered(url: str, clients: int) -> list[tuple[int, dict[str, Any]]]:
    """Every answer to ``clients`` threads posting without pause from before the agent listens until v2 answers."""
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    answers: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + SERVE_WITHIN_S

    def client() -> None:
        with httpx.Client(timeout=SERVE_WITHIN_S) as http:
            while time.monotonic() < deadline and not any(a.get("model_version") == "2" for _, a in answers[-8:]):
                try:
                    answer = http.post(f"{url}/v2/models/tiny/infer", json=body)
                except httpx.ConnectError:
                    time.sleep(0.002)
                    continue
                answers.append((answer.status_code, answer.json()))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_a_garbage_slot_manifest_falls_back_to_the_other_slot(
    device: dict[str, Any], zygote: Zygote, tmp_path: Path
) -> None:
    result = restarted(device, zygote, tmp_path, lambda d: garbage(d / "models/tiny/slot_b/manifest.json"))
    served_from_a_or_healed(result)
    assert "models/tiny/slot_b" in repaired_files(result["status"])


def test_both_slots_damaged_the_bundle_is_downloaded_again_through_tuf_and_the_server_is_told(
    fleet: Fleet, device: dict[str, Any], zygote: Zygote, tmp_path: Path
) -> None:
    def both(state_dir: Path) -> None:
        bit_flipped(model_file(state_dir, "a"))
        zeroed(model_file(state_dir, "b"))

    def reported_to_the_server(status: dict[str, Any]) -> None:
        moved = {r["quarantined_as"] for r in status["repairs"] if r["file"] == "models/tiny/slot_b"}
        deadline = time.monotonic() + SERVE_WITHIN_S
        while time.monotonic() < deadline and not moved & {e.get("quarantined_as") for e in repair_events(fleet)}:
            time.sleep(0.2)
        assert moved & {e.get("quarantined_as") for e in repair_events(fleet)}, "the repair never reached the server"

    result = restarted(device, zygote, tmp_path, both, reported_to_the_server)
    assert result["answer"]["model_version"] == "2"  # fetched again, verified, health-checked, committed
    assert "models/tiny/slot_b" in repaired_files(result["status"])
    assert result["status"]["last_update"]["status"] == "installed"


def repair_events(fleet: Fleet) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from fleet_server.models import DeviceEvent

    with fleet.app.state.session_factory() as session:
        rows = session.execute(sa.select(DeviceEvent.payload).where(DeviceEvent.type == "repair")).scalars()
        return [dict(r) for r in rows]


@pytest.mark.parametrize("damage", [garbage, truncated], ids=lambda f: f.__name__)
def test_a_damaged_telemetry_database_is_replaced_and_telemetry_goes_on(
    device: dict[str, Any], zygote: Zygote, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    result = restarted(device, zygote, tmp_path, lambda d: damage(d / "telemetry.db"))
    assert "telemetry.db" in repaired_files(result["status"])
    assert (result["state_dir"] / "telemetry.db").stat().st_size > 0  # a fresh buffer, in use


def test_status_and_readiness_tell_the_truth_when_nothing_local_can_serve(
    device: dict[str, Any], tmp_path: Path
) -> None:
    """Both slots damaged and the server unreachable: not ready (503), status exits 1 naming the problem."""
    state_dir = tmp_path / "device"
    shutil.copytree(device["state_dir"], state_dir)
    zeroed(model_file(state_dir, "a"))
    zeroed(model_file(state_dir, "b"))
    enrollment = json.loads((state_dir / "identity" / "enrollment.json").read_text())
    enrollment["server_url"] = enrollment["metadata_url"] = enrollment["targets_url"] = "http://127.0.0.1:9/"
    (state_dir / "identity" / "enrollment.json").write_text(json.dumps(enrollment))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--port", str(port)],
                               env=agent_env(state_dir), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready = _wait_for_answer(f"http://127.0.0.1:{port}/v2/health/ready", "failed verification")
        assert ready.status_code == 503 and "tiny" in ready.json()["error"], ready.text
        status = agent_cli(state_dir, "status", "--json", http_port=port)
        assert status.returncode == 1
        report = json.loads(status.stdout)
        assert report["health"] == "no-model" and report["models"]["tiny"]["ready"] is False
        assert "failed verification" in report["models"]["tiny"]["problem"]
    finally:
        process.terminate()
        process.wait(timeout=20)


def _wait_for_answer(url: str, text: str) -> httpx.Response:
    """The first answer of ``url`` that contains ``text`` (start-up verifies the slots first)."""
    deadline = time.monotonic() + SERVE_WITHIN_S
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=2)
            if text in answer.text:
                return answer
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered with {text!r}")
