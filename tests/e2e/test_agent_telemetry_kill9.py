"""kill -9 of the real agent while it serves: the server still counts all but the last few seconds of answers.

A real fleet server and a real agent process that installed tiny@1. A client sends inferences at a
steady rate for a while, the agent is killed with SIGKILL mid-stream (its 60 s window still open),
and a new agent process starts on the same state directory without anything else happening. The
window's last checkpoint (every 5 s by default) is queued at start and uploaded: the answers the
server counts for that window must be at most 10 s worth fewer than the answers served, and never
more (no window counted twice).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.device_agent.e2e_support import Fleet, agent_cli, start_daemon

RATE_PER_S = 100
SERVE_S = 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Fleet(tmp_path_factory.mktemp("fleet"))
    server.publish("tiny", 1)
    yield server
    server.close()


def counted_by_the_server(fleet: Fleet, device_id: str) -> int:
    from fleet_server.models import MetricWindow

    with fleet.app.state.session_factory() as session:
        rows = session.execute(sa.select(MetricWindow.payload).where(MetricWindow.device_id == device_id)).scalars()
        return sum(int(p["counters"]["requests"]) for p in rows)


def serve_until_killed(url: str, process: Any, served: list[int], stop: threading.Event) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    with httpx.Client(timeout=2) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                if client.post(f"{url}/v2/models/tiny/infer", json=body).status_code == 200:
                    served[0] += 1
            except httpx.HTTPError:
                return  # killed
            time.sleep(max(0.0, 1 / RATE_PER_S - (time.monotonic() - started)))


def test_kill_9_while_serving_loses_at_most_ten_seconds_of_answers(fleet: Fleet, tmp_path: Path) -> None:
    state_dir = tmp_path / "device"
    assert agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token()).returncode == 0
    device_id = json.loads((state_dir / "identity" / "enrollment.json").read_text())["device_id"]
    fleet.assign(device_id, "tiny", 1)
    assert agent_cli(state_dir, "run", "--once", "--no-http").returncode == 0
    settings = {"poll_interval_s": 2, "telemetry__window_s": 600}  # one window stays open through the kill
    served = [0]
    for daemon in start_daemon(state_dir, **settings):
        daemon.wait_ready("tiny")
        stop = threading.Event()
        client = threading.Thread(target=serve_until_killed, args=(daemon.url, daemon.process, served, stop))
        client.start()
        time.sleep(SERVE_S)
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(timeout=10)
        stop.set()
        client.join(timeout=10)
    assert served[0] > RATE_PER_S * SERVE_S / 3, served  # the client really kept the agent busy
    for daemon in start_daemon(state_dir, **settings):  # a new process: recovers, uploads, serves on
        daemon.wait_ready("tiny")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and counted_by_the_server(fleet, device_id) == 0:
            time.sleep(0.2)
    counted = counted_by_the_server(fleet, device_id)
    rate = served[0] / SERVE_S
    assert counted <= served[0], (counted, served)  # nothing counted twice
    assert served[0] - counted <= 10 * rate, f"lost {served[0] - counted} of {served[0]} answers (> 10 s worth)"
