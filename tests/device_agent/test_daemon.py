"""The daemon's polling policy: exponential backoff with jitter while the server cannot be reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.daemon import Daemon, backoff_s
from device_agent.identity import Enrollment
from tests.device_agent.e2e_support import free_port


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
