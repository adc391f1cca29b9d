"""A device enrolled with ``--root`` trusts the release root shipped with its image, not the server's word.

With the genuine root pinned, the device installs as usual. With a root whose keys the server's
metadata is not signed by (what a device sees when a compromised or impostor server answers its
enrollment), the device installs nothing: TUF refuses every piece of metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles.tuf.keys import generate_key
from bundles.tuf.root import make_root
from tests.device_agent.e2e_support import Fleet, agent_cli


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = Fleet(tmp_path_factory.mktemp("fleet"))
    server.publish("tiny", 1)
    yield server
    server.close()


def enroll_pinned(fleet: Fleet, state_dir: Path, root_file: Path) -> str:
    done = agent_cli(
        state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token(), "--root", str(root_file)
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads((state_dir / "identity" / "enrollment.json").read_text())["device_id"])


def update_once(state_dir: Path) -> dict:
    agent_cli(state_dir, "run", "--once", "--no-http")
    return dict(json.loads(agent_cli(state_dir, "status", "--json", http_port=1).stdout))


def test_a_device_pinned_to_the_genuine_root_installs(fleet: Fleet, tmp_path: Path) -> None:
    genuine = tmp_path / "root.json"
    genuine.write_bytes(fleet.http.get("/tuf/metadata/1.root.json").content)
    device_id = enroll_pinned(fleet, tmp_path / "device", genuine)
    fleet.assign(device_id, "tiny", 1)
    status = update_once(tmp_path / "device")
    assert status["last_update"]["status"] == "installed" and status["last_update"]["version"] == 1


def test_a_device_pinned_to_another_root_installs_nothing_from_this_server(fleet: Fleet, tmp_path: Path) -> None:
    keys = [generate_key(tmp_path / f"{role}.pem") for role in ("root", "targets", "snapshot", "timestamp")]
    other = tmp_path / "other-root.json"
    other.write_bytes(make_root([keys[0]], [keys[1]], keys[2].public_key, keys[3].public_key))
    device_id = enroll_pinned(fleet, tmp_path / "device", other)
    fleet.assign(device_id, "tiny", 1)
    status = update_once(tmp_path / "device")
    assert status["last_update"]["status"] == "failed"
    assert "threshold of valid signatures" in status["last_update"]["error"]  # TUF refused the server's metadata
    assert not any(model["slots"] for model in status["models"].values()), status  # nothing installed
    assert status["models"]["tiny"]["ready"] is False and status["health"] == "no-model"


def test_enroll_with_a_root_file_that_is_not_a_tuf_root_is_one_line_and_exit_2(fleet: Fleet, tmp_path: Path) -> None:
    bogus = tmp_path / "root.json"
    bogus.write_text('{"signed": {"_type": "targets"}}')
    done = agent_cli(tmp_path / "device", "enroll", "--server", fleet.url, "--token", "t", "--root", str(bogus))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not a signed TUF root" in done.stderr
