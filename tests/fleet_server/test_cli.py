"""``edgefleet-server`` CLI: init, keys, tokens, devices, groups, bundles; one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from fleet_server.settings import load_settings

runner = CliRunner()


def cli(*args: str, data_dir) -> str:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def initialised(tmp_path, monkeypatch):
    for name in ("EDGEFLEET_MODE", "EDGEFLEET_TOKEN_PEPPER", "EDGEFLEET_PUBLIC_URL", "EDGEFLEET_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "srv"
    output = runner.invoke(app, ["init", "--data-dir", str(data_dir), "--public-url", "https://fleet.example"]).output
    return data_dir, output


def test_init_creates_data_dir_keys_database_and_prints_the_admin_key_once(initialised):
    data_dir, output = initialised
    assert re.search(r"admin API key\s+efk_\S+", output)
    assert (data_dir / "keys" / "snapshot.pem").stat().st_mode & 0o077 == 0
    assert (data_dir / "server.env").stat().st_mode & 0o077 == 0
    assert load_settings(data_dir).mode == "production"
    again = runner.invoke(app, ["init", "--data-dir", str(data_dir)])
    assert again.exit_code == 0 and "efk_" not in again.output and "already exists" in again.output


def test_admin_commands_round_trip(initialised):
    data_dir, _ = initialised
    assert "efk_" in cli("api-keys", "create", "--name", "ci", "--role", "viewer", data_dir=data_dir)
    keys = json.loads(cli("api-keys", "list", "--json", data_dir=data_dir))
    assert {k["role"] for k in keys} == {"admin", "viewer"}
    cli("api-keys", "revoke", str(keys[0]["id"]), data_dir=data_dir)
    assert "efe_" in cli("enroll-token", "create", "--fleet", "lab", "--expires", "7d", data_dir=data_dir)
    cli("groups", "create", "canary", "--poll-interval", "60s", data_dir=data_dir)
    groups = json.loads(cli("groups", "list", "--json", data_dir=data_dir))
    assert groups[0]["poll_interval_s"] == 60
    devices = json.loads(cli("devices", "list", "--filter", "hw=pi4 and runtime=onnxruntime>=1.20", "--json",
                             data_dir=data_dir))  # fmt: skip
    assert devices == []
    assert json.loads(cli("bundles", "list", "--json", data_dir=data_dir)) == []
    actions = {e["action"] for e in json.loads(cli("audit", "--json", data_dir=data_dir))}
    assert {"api_key.create", "api_key.revoke", "enroll_token.create", "group.create"} <= actions


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["devices", "approve", "dev-nope"], "does not exist"),
        (["devices", "list", "--filter", "colour=red"], "unknown"),
        (["enroll-token", "create", "--fleet", "lab", "--expires", "soon"], "duration"),
        (["api-keys", "create", "--name", "x", "--role", "root"], "role"),
        (["bundles", "delete", "tiny", "1"], "not published"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_1(initialised, args, message):
    data_dir, _ = initialised
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_insecure_settings_stop_the_cli_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_MODE", "production")
    result = runner.invoke(app, ["api-keys", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "refusing insecure settings" in result.output


def test_subpackage_commands_are_attached_to_the_core_cli():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(command in result.output for command in ("rollout", "telemetry", "drift", "devices", "bundles"))
