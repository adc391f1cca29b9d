"""The edgefleet-agent command line: readable output, one-line errors, meaningful exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundles.selection import installed_runtimes
from device_agent.cli import main
from tests.device_agent.e2e_support import free_port
from tests.device_agent.helpers import Device, entry


@pytest.fixture(autouse=True)
def _no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point status at a port nothing listens on, and keep the host's agent config out."""
    for name in ("EDGEFLEET_AGENT_CONFIG", "EDGEFLEET_AGENT_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEFLEET_AGENT_HTTP_PORT", str(free_port()))


def test_status_of_an_empty_device_says_no_model_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(tmp_path), "status", "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["health"] == "no-model" and status["daemon"] == "not running" and status["device_id"] is None


def test_status_shows_the_active_and_previous_bundle_and_the_last_update(
    tmp_path: Path, published: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = Device.start(tmp_path, published)
    device.updater.deploy(entry("tiny", 1))
    device.updater.deploy(entry("tiny", 2))
    device.engine.close()
    assert main(["--state-dir", str(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    ort = installed_runtimes()["onnxruntime"]  # each slot says the runtime its variant runs on here
    assert f"v2 onnx-fp32 on onnxruntime {ort} [active, slot b]" in out
    assert f"v1 onnx-fp32 on onnxruntime {ort} [previous, slot a]" in out
    assert "last update tiny@2 installed" in out and "health      ok" in out


def test_enroll_against_an_unreachable_server_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["--state-dir", str(tmp_path), "enroll", "--server", url, "--token", "t"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgefleet-agent: error:") and "\n" not in err
    assert (tmp_path / "identity" / "device.key").exists() and not (tmp_path / "identity" / "enrollment.json").exists()


def test_a_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("poll_interval_s = 'often'\n")
    assert main(["--config", str(config), "status"]) == 2
    assert "poll_interval_s" in capsys.readouterr().err


def test_run_once_without_enrollment_serves_what_is_installed_and_exits_0(tmp_path: Path, published: Path) -> None:
    device = Device.start(tmp_path, published)
    device.updater.deploy(entry("tiny", 1))
    device.engine.close()
    assert main(["--state-dir", str(tmp_path), "run", "--once", "--no-http"]) == 0
