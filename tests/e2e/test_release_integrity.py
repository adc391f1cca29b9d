"""A compromised fleet server cannot borrow the release key (issue 12), with the real CLIs and a real agent.

The attacker controls the server's files and database (and so its online snapshot and timestamp
keys), not the release workstation. Each scene starts from an honest state: the ML engineer's
workstation published ``tiny@1`` through ``edgefleet-convert publish`` (which pinned the root and
started the ledger). Then the attacker tampers with the server, and the engineer runs the next
ordinary ``edgefleet-convert publish tiny@2 --yes`` as a separate process:

- an attacker key added to ``root.json`` (same version, re-signed by the attacker), an
  attacker-signed targets version listing the attacker's bundle, and bundle rows for it;
- a forged newer root (``2.root.json`` signed by the attacker only);
- an attacker-signed targets version that drops one of the engineer's targets;
- a server that replays an older (genuine) targets version.

Every time the publish exits non-zero with one line saying what differs, the release key signs
nothing (the server's targets metadata files and the workstation's ledger stay as they were), and a
device enrolled before the attack never installs the attacker's bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bundles.archive import pack_variant
from bundles.testing import build_bundle_dir, make_onnx_classifier
from bundles.tuf.keys import generate_key
from converter.cli import app as convert_app
from tests.device_agent.e2e_support import REPO_ROOT, Fleet, agent_cli

RUNNER = CliRunner()


def convert_cli(home: Path, *args: str) -> str:
    """``edgefleet-convert ARGS`` in-process (setup steps); fails the test on a non-zero exit."""
    result = RUNNER.invoke(convert_app, list(args), env={"EDGEFLEET_HOME": str(home)})
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def convert_process(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet-convert ARGS`` as its own process, as the engineer runs it."""
    env = {**os.environ, "EDGEFLEET_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", "from converter.cli import main; main()", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def register_and_convert(home: Path, work: Path, seed: int) -> None:
    model = make_onnx_classifier(work / f"tiny-{seed}.onnx", seed=seed)
    x = np.random.default_rng(seed).normal(size=(64, 4)).astype(np.float32)
    np.savez(work / f"eval-{seed}.npz", x=x, y=np.argmax(x @ model.weight + model.bias, axis=1))
    convert_cli(home, "register", "tiny", "--source", f"onnx:{model.path}", "--input", "x: float32[-1,4]",
                "--task", "classification", "--eval", str(work / f"eval-{seed}.npz"))  # fmt: skip
    convert_cli(home, "convert", "tiny", "--targets", "onnx", "--quantize", "fp32")


@pytest.fixture(scope="module")
def workstation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release workstation with its keys and two converted versions, tiny@1 and tiny@2 (copied per scene)."""
    work = tmp_path_factory.mktemp("workstation")
    home = work / "home"
    convert_cli(home, "keys", "init")
    register_and_convert(home, work, seed=1)
    register_and_convert(home, work, seed=2)
    return home


@dataclass
class Scene:
    home: Path
    fleet: Fleet
    work: Path

    def publish(self, ref: str) -> subprocess.CompletedProcess[str]:
        return convert_process(self.home, "publish", ref, "--server", self.fleet.url, "--api-key",
                               self.fleet.admin_key, "--yes")  # fmt: skip

    def metadata_files(self) -> dict[str, bytes]:
        directory = self.fleet.settings.tuf_dir / "metadata"
        return {p.name: p.read_bytes() for p in sorted(directory.glob("*.targets.json"))}

    def ledger(self) -> dict[str, Any]:
        (trust,) = (self.home / "trust").iterdir()
        return dict(json.loads((trust / "ledger.json").read_text()))


@pytest.fixture
def scene(workstation: Path, tmp_path: Path) -> Iterator[Scene]:
    home = tmp_path / "home"
    shutil.copytree(workstation, home)
    fleet = Fleet(tmp_path / "fleet", install_root=False)
    convert_cli(home, "publish", "tiny@1", "--server", fleet.url, "--api-key", fleet.admin_key, "--yes")
    yield Scene(home, fleet, tmp_path)
    fleet.close()


class Attacker:
    """Whoever controls the server's disk and database: writes metadata with the server's online keys."""

    def __init__(self, fleet: Fleet, work: Path) -> None:
        self.fleet, self.host = fleet, fleet.app.state.tuf
        self.repo = self.host.repository()
        self.root_key = generate_key(work / "attacker-root.pem")
        self.targets_key = generate_key(work / "attacker-targets.pem")

    def add_keys_to_root(self) -> None:
        """The attacker's keys in the root and targets roles of the current root, re-signed by the attacker."""
        from tuf.api.metadata import Metadata

        md = Metadata.from_bytes(self.repo.trusted_root())
        md.signed.add_key(self.root_key.public_key, "root")
        md.signed.add_key(self.targets_key.public_key, "targets")
        md.sign(self.root_key, append=True)
        self._write_root(md)

    def forge_newer_root(self) -> None:
        """Root v2 whose root and targets keys are the attacker's, signed by the attacker only."""
        from tuf.api.metadata import Metadata

        md = Metadata.from_bytes(self.repo.trusted_root())
        root = md.signed
        root.version += 1
        for role, key in (("root", self.root_key), ("targets", self.targets_key)):
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(key.public_key, role)
        forged = Metadata(root)
        forged.sign(self.root_key)
        self._write_root(forged)

    def _write_root(self, md: Any) -> None:
        from bundles.tuf.common import serialize

        data = serialize(md)
        self.repo._write_metadata(f"{md.signed.version}.root.json", data)
        self.repo._write_metadata("root.json", data)

    def serve_targets(self, add: dict[str, Path], drop: tuple[str, ...] = ()) -> int:
        """A new current targets version signed by the attacker's targets key, listing ``add``."""
        from tuf.api.metadata import Metadata, Targets

        from bundles.tuf.common import serialize
        from bundles.tuf.publication import target_file
        from bundles.tuf.repository import _meta_file

        current = Metadata[Targets].from_bytes(self.repo.current_targets()).signed
        listed = {p: t for p, t in current.targets.items() if p not in drop}
        listed.update({path: target_file(path, local) for path, local in add.items()})
        md = Metadata(Targets(version=current.version + 1, targets=listed))
        md.sign(self.targets_key)
        data = serialize(md)
        for path, local in add.items():
            self.repo._store_target(listed[path], local)
        self.repo._write_metadata(f"{md.signed.version}.targets.json", data)
        self.repo._write_snapshot_and_timestamp(_meta_file(md.signed.version, data), *self.host.online_signers())
        return md.signed.version

    def replay_targets(self, version: int) -> None:
        """Snapshot and timestamp pointing at an older, genuinely signed targets version."""
        from bundles.tuf.repository import _meta_file

        data = (self.fleet.settings.tuf_dir / "metadata" / f"{version}.targets.json").read_bytes()
        self.repo._write_snapshot_and_timestamp(_meta_file(version, data), *self.host.online_signers())

    def evil_bundle(self) -> dict[str, Path]:
        src = self.fleet.work / "evil-src"
        manifest = build_bundle_dir(src, name="evil", version=1, seed=7)
        files = {"evil/1/manifest.json": src / "manifest.json"}
        for variant in manifest.variants:
            files[f"evil/1/{variant.id}.tar.gz"] = pack_variant(src, manifest, variant.id, src / f"{variant.id}.tgz")
        return files

    def add_bundle_rows(self, paths: list[str]) -> None:
        """Bundle rows for what the (attacker-signed) current targets list, so the director can assign it."""
        from fleet_server.db import session_scope
        from fleet_server.services import registry

        with session_scope(self.fleet.app.state.session_factory) as session:
            registry.record_publication(session, self.host, paths, "attacker")


def enroll(scene: Scene) -> tuple[Path, str]:
    state_dir = scene.work / "device"
    done = agent_cli(state_dir, "enroll", "--server", scene.fleet.url, "--token", scene.fleet.enroll_token())
    assert done.returncode == 0, done.stderr
    return state_dir, str(json.loads((state_dir / "identity" / "enrollment.json").read_text())["device_id"])


def device_round(state_dir: Path) -> dict[str, Any]:
    agent_cli(state_dir, "run", "--once", "--no-http")
    return dict(json.loads(agent_cli(state_dir, "status", "--json", http_port=1).stdout))


def assert_refused_and_nothing_signed(scene: Scene, before: dict[str, bytes], *expected: str) -> str:
    ledger_before = scene.ledger()
    done = scene.publish("tiny@2")
    error = done.stderr.strip()
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert error.startswith("error: ") and "\n" not in error, error
    assert "nothing was signed" in error, error
    for text in expected:
        assert text in error, error
    assert scene.metadata_files() == before  # no targets version signed by the release key appeared
    assert scene.ledger() == ledger_before
    assert not any((scene.home / "trust").glob("*/pending.targets.json"))
    return error


def test_an_attacker_key_added_to_the_root_with_attacker_signed_targets_is_refused(scene: Scene) -> None:
    state_dir, device_id = enroll(scene)  # a device of the fleet before the attack: it trusts the genuine root
    attacker = Attacker(scene.fleet, scene.work)
    attacker.add_keys_to_root()
    evil = attacker.evil_bundle()
    attacker.serve_targets(evil)
    attacker.add_bundle_rows(list(evil))
    scene.fleet.assign(device_id, "evil", 1)
    before = scene.metadata_files()

    assert_refused_and_nothing_signed(
        scene, before, "is not the pinned root", f"targets keys added: {attacker.targets_key.public_key.keyid[:12]}"
    )

    status = device_round(state_dir)  # the director sends the device to the attacker's bundle
    assert status["last_update"]["status"] == "failed" and status["last_update"]["model"] == "evil"
    assert "threshold" in status["last_update"]["error"] or "signature" in status["last_update"]["error"].lower()
    assert not any(m["slots"] for m in status["models"].values()) and status["health"] == "no-model", status


def test_a_forged_newer_root_is_refused(scene: Scene) -> None:
    state_dir, device_id = enroll(scene)
    attacker = Attacker(scene.fleet, scene.work)
    attacker.forge_newer_root()
    evil = attacker.evil_bundle()
    attacker.serve_targets(evil)
    attacker.add_bundle_rows(list(evil))
    scene.fleet.assign(device_id, "evil", 1)
    before = scene.metadata_files()
    assert_refused_and_nothing_signed(scene, before, "root v2", "does not verify", "root keys added")
    status = device_round(state_dir)
    assert status["last_update"]["status"] == "failed", status
    assert not any(m["slots"] for m in status["models"].values()) and status["health"] == "no-model", status


def test_a_targets_version_dropping_one_of_the_engineers_targets_is_refused(scene: Scene) -> None:
    attacker = Attacker(scene.fleet, scene.work)
    version = attacker.serve_targets({}, drop=("tiny/1/onnx-fp32.tar.gz",))
    before = scene.metadata_files()
    assert_refused_and_nothing_signed(scene, before, f"targets v{version}", "not signed by the release key",
                                      "drops 1 target(s) this workstation signed: tiny/1/onnx-fp32.tar.gz")  # fmt: skip


def test_a_server_replaying_an_older_targets_version_is_refused(scene: Scene) -> None:
    published = scene.publish("tiny@2")  # the engineer's second, honest publication: targets v2
    assert published.returncode == 0, published.stderr
    Attacker(scene.fleet, scene.work).replay_targets(1)
    before = scene.metadata_files()
    assert_refused_and_nothing_signed(scene, before, "serves targets v1, older than v2")


def test_an_honest_server_still_takes_the_next_publication_from_the_ledger(scene: Scene) -> None:
    before = scene.metadata_files()
    dry = convert_process(scene.home, "publish", "tiny@2", "--server", scene.fleet.url, "--api-key",
                          scene.fleet.admin_key, "--json")  # fmt: skip
    assert dry.returncode == 2 and "rerun with --yes" in dry.stderr, (dry.stdout, dry.stderr)
    shown = json.loads(dry.stdout)  # the diff, as JSON, and nothing signed without --yes
    assert shown["signed"] is False and shown["plan"]["targets_version"] == 2 and shown["plan"]["removed"] == []
    assert shown["plan"]["added"] == ["tiny/2/manifest.json", "tiny/2/onnx-fp32.tar.gz"]
    assert scene.metadata_files() == before

    done = scene.publish("tiny@2")
    assert done.returncode == 0, done.stderr
    assert "targets v2 for" in done.stdout and "+ tiny/2/manifest.json" in done.stdout
    assert sorted(scene.ledger()["targets"]) == [
        "tiny/1/manifest.json", "tiny/1/onnx-fp32.tar.gz", "tiny/2/manifest.json", "tiny/2/onnx-fp32.tar.gz"
    ]  # fmt: skip


def test_a_device_refuses_to_be_directed_below_the_release_floor_and_reports_why(scene: Scene) -> None:
    assert scene.publish("tiny@2").returncode == 0
    state_dir, device_id = enroll(scene)
    scene.fleet.assign(device_id, "tiny", 2)
    assert device_round(state_dir)["last_update"]["status"] == "installed"

    done = convert_process(scene.home, "floor", "tiny@2", "--server", scene.fleet.url, "--api-key",
                           scene.fleet.admin_key, "--yes", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["signed"] and answer["plan"]["floors"] == {"tiny": 2}
    assert "tiny/1/manifest.json" in answer["plan"]["changed"]  # every target of tiny carries the floor

    scene.fleet.assign(device_id, "tiny", 1)  # the director (honest or not) sends the device below the floor
    status = device_round(state_dir)
    assert status["last_update"]["status"] == "failed" and status["last_update"]["version"] == 1
    assert "the release key set the minimum version of tiny to 2" in status["last_update"]["error"]
    active = [s["version"] for s in status["models"]["tiny"]["slots"] if s["state"] == "active"]
    assert active == [2], status["models"]
    reported = [e for e in scene.fleet.install_events(device_id) if e["to_version"] == 1]
    assert reported and reported[-1]["result"] == "failed" and "minimum version" in reported[-1]["reason"]
    assert [e["downgrade"] for e in scene.fleet.install_events(device_id) if e["to_version"] == 2] == [False]


def test_a_director_rollback_at_or_above_the_floor_installs_and_the_install_event_says_downgrade(
    scene: Scene,
) -> None:
    assert scene.publish("tiny@2").returncode == 0
    done = convert_process(scene.home, "floor", "tiny@1", "--server", scene.fleet.url, "--api-key",
                           scene.fleet.admin_key, "--yes")  # fmt: skip
    assert done.returncode == 0, done.stderr
    state_dir, device_id = enroll(scene)
    scene.fleet.assign(device_id, "tiny", 2)
    assert device_round(state_dir)["last_update"]["status"] == "installed"

    scene.fleet.assign(device_id, "tiny", 1)  # rollback by the director: allowed, the floor is 1
    status = device_round(state_dir)
    assert status["last_update"]["status"] == "installed" and status["last_update"]["version"] == 1, status
    events = {e["to_version"]: e for e in scene.fleet.install_events(device_id) if e["result"] == "installed"}
    assert events[1]["downgrade"] is True and events[1]["from_version"] == 2, events
    assert events[2]["downgrade"] is False


def test_a_revoked_version_leaves_the_signed_targets_and_takes_no_new_assignment(scene: Scene) -> None:
    assert scene.publish("tiny@2").returncode == 0
    done = convert_process(scene.home, "revoke", "tiny@1", "--server", scene.fleet.url, "--api-key",
                           scene.fleet.admin_key, "--yes")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "- tiny/1/manifest.json" in done.stdout
    state = scene.fleet.http.get("/api/v1/admin/tuf/state", headers=scene.fleet.admin).json()
    assert sorted(state["targets"]["signed"]["targets"]) == ["tiny/2/manifest.json", "tiny/2/onnx-fp32.tar.gz"]
    bundles = scene.fleet.http.get("/api/v1/admin/bundles", headers=scene.fleet.admin).json()
    assert {b["version"]: b["deprecated"] for b in bundles} == {2: False, 1: True}
    _, device_id = enroll(scene)
    body = {"device_id": device_id, "model_name": "tiny", "bundle_version": 1}
    assert scene.fleet.http.put("/api/v1/admin/assignments", headers=scene.fleet.admin, json=body).status_code == 409
