"""The fleet simulator at small scale: real fleet servers on loopback, virtual devices running the agent's
real client code (enrollment, ETag polls, TUF, telemetry uploader), scenario outcomes asserted.

Two simulations (about a minute each), each with its fleet sharded over two simulator processes: a bad
version stopped at its first wave and rolled back, and a good version rolled out on a bad day (packet
loss, slow links, cut and tampered downloads, power cuts during installs, devices offline and
returning, skewed clocks) on PostgreSQL with two server processes, one of which (the background leader)
is killed mid-rollout. A simulator process that dies ends the run with an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bundles.errors import ConfigError
from simulators.fleet.report import write_report
from simulators.fleet.runner import Simulation
from simulators.fleet.scenario import SimulatorSpec, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "simulators" / "scenarios"


def _run(scenario_file: str, tmp_path: Path, workers: int = 2, **fleet: object):
    scenario = load_scenario(SCENARIOS / scenario_file)
    scenario = dataclasses.replace(scenario, fleet=dataclasses.replace(scenario.fleet, **fleet),
                                   simulator=SimulatorSpec(workers=workers))  # fmt: skip
    console = Console(file=open(tmp_path / "console.txt", "w"), width=120)  # noqa: SIM115
    return Simulation(scenario, tmp_path / "run", console=console, progress=False).run()


def test_bad_version_is_halted_at_its_first_wave_and_rolled_back(tmp_path: Path) -> None:
    result = _run("bad-rollout.toml", tmp_path, devices=24)
    assert result.workers == 2
    baseline, bad = result.rollouts
    assert baseline.state == "completed" and baseline.converged_s is not None
    assert bad.state == "rolled_back", bad.decisions
    rollback = bad.decisions[-1]
    assert (rollback["action"], rollback["wave"]) == ("rollback", 1)
    assert "fallback_rate" in rollback["reason"]  # the devices fell back to the cloud, as real agents do
    first_wave = bad.waves[0]["devices"]
    assert 1 <= bad.exposed <= first_wave  # only the first wave ever ran the bad version
    assert [w["state"] for w in bad.waves][1:] == ["cancelled", "cancelled"]
    assert bad.converged_s is not None and bad.without_working_model == 0  # every device is back on v1
    assert result.ok
    page = write_report(result, tmp_path / "report")
    assert page.read_text().startswith("<!doctype html>") and "data:image/png;base64," in page.read_text()
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["rollouts"][1]["state"] == "rolled_back" and data["timeline"] and data["workers"] == 2
    assert data["totals"]["fallbacks"] > 0 and data["totals"]["errors"] == 0


@pytest.mark.postgres
def test_good_rollout_converges_on_a_bad_day_and_survives_losing_the_background_leader(tmp_path: Path) -> None:
    result = _run("faults.toml", tmp_path, devices=24)
    _, good = result.rollouts
    assert good.state == "completed", result.events
    assert good.converged_s is not None and good.without_working_model == 0
    assert all(d["action"] != "rollback" for d in good.decisions)
    events = " | ".join(what for _, what in result.events)
    assert "(background leader: True) killed with SIGKILL" in events and "restarted" in events
    t = result.totals
    assert t["injected_faults"] > 0 and t["power_losses"] > 0 and t["transport_errors"] > 0
    assert result.enrolled == result.devices == 24


def test_a_scenario_with_an_unknown_key_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError, match="unknown key 'devcies' in \\[fleet\\]"):
        parse_scenario({"fleet": {"devcies": 3}, "bundles": [{"version": 1}]})
    with pytest.raises(ConfigError, match="unknown hardware profile 'pi3'"):
        parse_scenario({"fleet": {"profiles": {"pi3": 1.0}}, "bundles": [{"version": 1}]})
    with pytest.raises(ConfigError, match="rollout of version 3 has no"):
        parse_scenario({"bundles": [{"version": 1}], "rollouts": [{"version": 3}]})


def test_the_cli_refuses_a_broken_scenario_file_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[fleet\ndevices = 3\n")
    done = subprocess.run([sys.executable, "-m", "simulators.fleet.cli", "check", str(broken)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("edgefleet-sim: scenario:") and "not valid TOML" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for name in ("good-rollout.toml", "bad-rollout.toml", "faults.toml"):
        assert load_scenario(SCENARIOS / name).rollouts
