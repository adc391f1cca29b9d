"""Config (TOML + environment, sizes with units), the device key and crash-safe writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bundles.durable import atomic_write_json
from bundles.errors import ConfigError, KeyFileError
from device_agent.config import load_config, parse_bytes
from device_agent.identity import Enrollment, load_or_create_key, public_key_hex


def test_config_precedence_is_defaults_then_toml_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nstate_dir = "/srv/agent"\npoll_interval_s = 60\nmax_bundle_bytes = "512MiB"\n')
    config = load_config(path, environ={"EDGEFLEET_AGENT_POLL_INTERVAL_S": "15", "EDGEFLEET_AGENT_THREADS": "2"})
    assert config.state_dir == Path("/srv/agent")
    assert config.poll_interval_s == 15.0 and config.threads == 2
    assert config.max_bundle_bytes == 512 * 2**20
    assert config.http_port == 8181 and config.record_path == Path("/srv/agent/deployment.json")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1000, 1000), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kB", 1500), ("10", 10)],
)
def test_sizes_accept_units(value: object, expected: int) -> None:
    assert parse_bytes(value, "max_bundle_bytes") == expected


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("poll_interval_s = -1", "greater than 0"),
        ("no_such_key = 1", "unknown agent setting"),
        ('max_bundle_bytes = "lots"', "not a size"),
        ("threads = [", "not valid TOML"),
        ("max_state_saves = 1", "at least 4"),
    ],
)
def test_bad_config_is_a_readable_config_error(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_device_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "identity")
    path = tmp_path / "identity" / "device.key"
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_key(tmp_path / "identity")
    assert public_key_hex(again) == public_key_hex(key) and len(public_key_hex(key)) == 64


def test_a_device_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_key(tmp_path)
    os.chmod(tmp_path / "device.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_key(tmp_path)


def test_enrollment_round_trips_and_is_private(tmp_path: Path) -> None:
    enrollment = Enrollment(
        "http://fleet", "dev-1", "tok", "accepted", "http://fleet/tuf/metadata/", "http://fleet/tuf/targets/"
    )
    enrollment.save(tmp_path, {"signed": {"_type": "root"}})
    assert Enrollment.load(tmp_path) == enrollment
    assert (tmp_path / "enrollment.json").stat().st_mode & 0o777 == 0o600
    assert Enrollment.load(tmp_path / "nowhere") is None


def test_atomic_write_leaves_old_or_new_content_never_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
