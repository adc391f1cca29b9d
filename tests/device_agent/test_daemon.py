"""The daemon: backoff with jitter while the server cannot be reached, heartbeats, fallback pipeline swaps."""

from __future__ import annotations

import gc
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.daemon import Daemon, backoff_s
from device_agent.identity import Enrollment
from tests.device_agent.e2e_support import free_port
from tests.device_agent.helpers import DirectorySource, entry, publish_bundle


@pytest.mark.parametrize(
    ("failures", "low", "high"), [(1, 2.5, 5.0), (2, 5.0, 10.0), (3, 10.0, 20.0), (12, 300.0, 600.0)]
)
def test_backoff_doubles_with_jitter_up_to_the_cap(failures: int, low: float, high: float) -> None:
    waits = [backoff_s(failures, 5.0, 600.0) for _ in range(50)]
    assert all(low <= w <= high for w in waits) and len(set(waits)) > 1


def test_an_unreachable_server_backs_off_and_keeps_serving(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    Enrollment(url, "dev-1", "token", "accepted", f"{url}/tuf/metadata/", f"{url}/tuf/targets/").save(
        tmp_path / "identity", {"signed": {"_type": "root"}}
    )
    agent = Agent.from_config(
        environ={}, state_dir=tmp_path, backoff_initial_s=4, backoff_max_s=60, request_timeout_s=2
    )
    daemon = Daemon(agent)
    assert daemon.connect()
    waits = [daemon.round() for _ in range(3)]
    assert 2 <= waits[0] <= 4 and 4 <= waits[1] <= 8 and 8 <= waits[2] <= 16
    assert daemon.failures == 3
    agent.close()


class BusyServer(BaseHTTPRequestHandler):
    """A fleet server whose database is busy: every request gets the documented 503 with ``Retry-After``."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        body = b'{"detail": "the database is unavailable; retry later"}'
        self.send_response(503)
        self.send_header("Retry-After", "40")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_a_server_that_says_retry_after_is_not_polled_again_sooner(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    Enrollment(url, "dev-1", "token", "accepted", f"{url}/tuf/metadata/", f"{url}/tuf/targets/").save(
        tmp_path / "identity", {"signed": {"_type": "root"}}
    )
    agent = Agent.from_config(environ={}, state_dir=tmp_path, backoff_initial_s=4, backoff_max_s=60)
    daemon = Daemon(agent)
    try:
        assert daemon.connect()
        assert daemon.round() == 40.0  # its own backoff would have been 2 to 4 s
        assert daemon.failures == 1
    finally:
        agent.close()
        server.shutdown()
        server.server_close()


def agent_with_model(tmp_path: Path) -> Agent:
    """An agent (with telemetry) that has installed tiny@1 through the real update machine."""
    targets = tmp_path / "targets"
    publish_bundle(targets, tmp_path / "work", "tiny", 1)
    agent = Agent.from_config(environ={}, state_dir=tmp_path / "device", min_free_disk_bytes=0, health_runs=2)
    agent.updater.set_source(DirectorySource(targets, tmp_path / "device" / "cache"))
    agent.updater.apply({"models": [entry("tiny", 1)]})
    assert agent.engine.ready("tiny")
    return agent


def buffered_events(agent: Agent, event_type: str) -> list[dict[str, Any]]:
    batch = agent.recorder.buffer.next_batch(max_items=1000, max_bytes=10_000_000)
    assert batch is not None
    return [e for e in batch.events if e["type"] == event_type]


def test_each_round_buffers_a_heartbeat_with_health_versions_and_queue(tmp_path: Path) -> None:
    agent = agent_with_model(tmp_path)
    agent.predict({"x": np.zeros((1, 4), dtype=np.float32)})
    Daemon(agent).heartbeat(agent.inventory())
    (beat,) = buffered_events(agent, "heartbeat")
    assert beat["health"] == "ok" and beat["serving"] == ["tiny"]
    assert {"name": "tiny", "version": 1, "state": "active"} in beat["models"]
    assert beat["queue"]["completed"] >= 1 and beat["queue"]["running"] == 0
    assert beat["update_in_progress"] is None and beat["uptime_s"] >= 0
    agent.close()


def test_a_device_without_a_model_says_so_in_its_heartbeat(tmp_path: Path) -> None:
    agent = Agent.from_config(environ={}, state_dir=tmp_path)
    Daemon(agent).heartbeat(agent.inventory())
    (beat,) = buffered_events(agent, "heartbeat")
    assert (beat["health"], beat["models"], beat["serving"]) == ("no-model", [], [])
    agent.close()


def test_a_new_fallback_section_replaces_the_pipeline_and_closes_the_old_one(tmp_path: Path) -> None:
    agent = agent_with_model(tmp_path)
    daemon = Daemon(agent)
    daemon._apply_fallback({"url": f"http://127.0.0.1:{free_port()}/v2", "model": "tiny"})
    first = agent.pipeline
    assert first.cloud is not None
    first.predict("tiny", {"x": np.zeros((1, 4), dtype=np.float32)})  # starts its deadline worker
    daemon._apply_fallback({"url": f"http://127.0.0.1:{free_port()}/v2", "model": "tiny"})
    assert agent.pipeline is not first and agent.pipeline.recorder is first.recorder
    assert first.cloud.client.is_closed, "the old pipeline's httpx client was closed"
    assert first._executor is not None and first._executor._shutdown, "its deadline threads were released"
    daemon._apply_fallback({"url": f"http://127.0.0.1:{free_port()}/v2", "model": "tiny"})
    agent.close()


def test_the_daemon_freezes_its_start_up_objects_out_of_the_collectors_way_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    Enrollment(url, "dev-1", "token", "accepted", f"{url}/tuf/metadata/", f"{url}/tuf/targets/").save(
        tmp_path / "identity", {"signed": {"_type": "root"}}
    )
    agent = Agent.from_config(environ={}, state_dir=tmp_path, request_timeout_s=1)
    frozen_during_rounds: list[int] = []
    monkeypatch.setattr(Daemon, "round", lambda self: frozen_during_rounds.append(gc.get_freeze_count()) or 1.0)
    assert gc.get_freeze_count() == 0
    Daemon(agent).run(once=True, http=False)
    assert frozen_during_rounds and frozen_during_rounds[0] > 1000  # start-up objects, frozen
    assert gc.get_freeze_count() == 0  # given back to the collector when the daemon stops
