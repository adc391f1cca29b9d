"""``edgefleet-server rollout ...`` against a real database: the journey's commands, and one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from tests.fleet_server.conftest import TEST_PEPPER


@pytest.fixture
def run(database_url, db_engine, tmp_path, monkeypatch):
    for key, value in {"EDGEFLEET_DATA_DIR": str(tmp_path), "EDGEFLEET_DATABASE_URL": database_url,
                       "EDGEFLEET_TOKEN_PEPPER": TEST_PEPPER, "EDGEFLEET_PUBLIC_URL": "https://fleet.test",
                       "EDGEFLEET_MODE": "production", "COLUMNS": "200"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["rollout", *args])

    return invoke


def test_journey_create_show_pause_resume_rollback(run, fleet):
    fleet.add_devices(5)
    created = run("create", "digits@2", "--to", "group:lab", "--waves", "1%,10%,50%,100%", "--soak", "30m",
                  "--gate", "error_rate<0.01", "--gate", "p99_ms<40", "--gate", "psi<0.2", "--on-breach", "rollback",
                  "--json")  # fmt: skip
    assert created.exit_code == 0, created.output
    view = json.loads(created.output)
    assert view["state"] == "running" and [w["spec"] for w in view["waves"]] == ["1%", "10%", "50%", "100%"]
    assert view["policy"]["gates"] == ["error_rate<0.01", "p99_ms<40", "psi<0.2"]
    rollout_id = str(view["id"])
    evaluated = run("evaluate", rollout_id)
    assert evaluated.exit_code == 0 and "install_success>=0.95" in evaluated.output and "waves" in evaluated.output
    shown = run("show", rollout_id, "--devices")
    assert shown.exit_code == 0 and "told to install" in shown.output and "decisions" in shown.output
    assert "running -> paused" in run("pause", rollout_id).output
    assert "paused -> running" in run("resume", rollout_id).output
    rolled = run("rollback", rollout_id)
    assert rolled.exit_code == 0 and "running -> rolled_back" in rolled.output
    listed = json.loads(run("list", "--json").output)
    assert [(r["id"], r["state"]) for r in listed] == [(int(rollout_id), "rolled_back")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "digits@2", "--to", "group:lab", "--gate", "latency<3"), "unknown metric 'latency'"),
        (("create", "digits", "--to", "group:lab"), "NAME@VERSION"),
        (("create", "digits@2", "--to", "group:lab", "--soak", "forever"), "duration 'forever'"),
        (("show", "42"), "rollout 42 does not exist"),
        (("resume", "42"), "rollout 42 does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_1(run, fleet, args, message):
    fleet.add_devices(2)
    result = run(*args)
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") <= 2


def test_pin_and_unpin(run, fleet):
    ids = fleet.add_devices(2)
    odd = fleet.add_devices(1, caps={"arch": "x86_64", "os": "linux", "runtimes": {}}, version=None)
    pinned = run("pin", "digits@1", "--to", "group:lab")
    assert pinned.exit_code == 0 and "pinned 2 device(s) to digits@1" in pinned.output
    assert f"not pinned {odd[0]}: no variant of digits@1 can run here" in pinned.output
    assert all(fleet.assignment(d).pinned for d in ids)
    assert "unpinned 2 device(s)" in run("unpin", "digits", "--to", "group:lab").output
