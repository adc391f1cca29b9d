"""``make demo`` is a promise in the README: run it as a user would and check its verdict.

The demo drives the real command-line tools end to end (train, register, convert, serve, publish,
enroll, roll out, install through TUF, predict, a faulty
retrain rolled back by its drift gate), so this test is also the journey test that keeps
JOURNEYS.md true. Training is shortened; everything else is the real thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_ends_with_a_verified_prediction_from_the_device(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFLEET_DEMO_DIR": str(tmp_path / "demo"), "EDGEFLEET_DEMO_TRAIN_S": "4"}
    result = subprocess.run(
        [sys.executable, "-m", "simulators.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "verified prediction" in output
    assert "installed" in output  # edgefleet-agent status shows the committed install
    assert re.search(r"device-2 serves tflite-\S+ on litert", output), output[-4000:]  # the LiteRT-only board
    assert "running -> completed" in output  # the good rollout passed its gates on live traffic
    assert "running -> rolled_back" in output and "gate breached: psi=" in output  # the faulty retrain was stopped
