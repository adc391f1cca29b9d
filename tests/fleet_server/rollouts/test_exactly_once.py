"""Background work runs exactly once, whatever the number of server processes (issue 15, finding 2).

The server runs as a user runs it (``edgefleet-server run``, real worker processes, a 0.2 s tick) on
a rollout with a one-second soak; the test plays the devices, writing their install events and
windows as intake stores them when each is released. Every decision must be recorded once, and one
process must hold the background leadership; with two workers, every scrape of ``/metrics`` (sixteen
at once, so that both workers answer) must show the sum over both. On PostgreSQL the leader is then killed with SIGKILL
in the middle of the rollout: another server process must take over and finish it, still deciding
everything once.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from fleet_server.db import session_scope, utcnow
from fleet_server.rollouts.models import Rollout, RolloutDecision, RolloutDevice
from fleet_server.rollouts.service import CreateRequest, create_rollout
from tests.fleet_server.rollouts.conftest import policy
from tests.fleet_server.server_process import ServerProcess

FAST = {"EDGEFLEET_ROLLOUT_TICK_S": "0.2", "EDGEFLEET_LEADER_CHECK_S": "0.2"}
SOAK_S = 1.0


def start_rollout(fleet, factory) -> int:
    fleet.add_devices(4)
    rollout_policy = policy(waves="50%,100%", soak_s=SOAK_S, device_timeout_s=120.0, gates=("error_rate<0.01 min=10",))
    with session_scope(factory) as session:
        return create_rollout(session, CreateRequest("digits", 2, ("group:lab",), rollout_policy), "test", utcnow()).id


def play_devices(fleet, factory, rollout_id: int, until_state: str, timeout_s: float = 45.0,
                 reported: set[str] | None = None, stop_after_first_wave: bool = False) -> set[str]:  # fmt: skip
    """Report install and a soak-long window for each device as soon as it is released."""
    reported = set() if reported is None else reported
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with factory() as session:
            state = session.get(Rollout, rollout_id).state
            query = select(RolloutDevice.device_id, RolloutDevice.start_after).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.start_after.is_not(None)
            )
            released = dict(session.execute(query).tuples().all())
        if state == until_state or (stop_after_first_wave and released):
            return set(released)
        for device_id, start in released.items():
            if device_id not in reported:
                fleet.healthy_device(device_id, 2, start, SOAK_S, requests=20)
                reported.add(device_id)
        time.sleep(0.1)
    raise AssertionError(f"rollout {rollout_id} did not reach {until_state} within {timeout_s} s")


def actions(factory, rollout_id: int) -> list[str]:
    with factory() as session:
        query = select(RolloutDecision.action).where(RolloutDecision.rollout_id == rollout_id)
        return list(session.scalars(query.order_by(RolloutDecision.id)))


def test_two_workers_decide_every_step_once_and_every_scrape_shows_the_sum_over_both(database_url, fleet, factory,
                                                                                     tmp_path):  # fmt: skip
    rollout_id = start_rollout(fleet, factory)
    with ServerProcess(database_url, tmp_path / "data", workers=2, **FAST) as server:
        play_devices(fleet, factory, rollout_id, "completed")
        # scrapes at once reach both workers; each must answer the sum over both, not its own registry
        assert server.metric_in_scrapes("edgefleet_background_leader") == [1] * 16
        assert server.metric_in_scrapes("edgefleet_rollout_decisions_total") == [2] * 16  # advance, complete
        assert min(server.metric_in_scrapes("edgefleet_rollout_tick_duration_seconds_count")) > 0
    assert actions(factory, rollout_id) == ["create", "start", "advance", "complete"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_killing_the_leader_hands_the_background_work_to_another_server(database_url, fleet, factory, tmp_path):
    servers = [ServerProcess(database_url, tmp_path / f"node{i}", **FAST) for i in range(2)]
    try:
        leaders = [s for s in servers if s.metric("edgefleet_background_leader") == 1]
        assert len(leaders) == 1
        leader, survivor = leaders[0], next(s for s in servers if s is not leaders[0])
        rollout_id = start_rollout(fleet, factory)
        first_wave = play_devices(fleet, factory, rollout_id, "completed", stop_after_first_wave=True)
        leader.kill()  # mid-rollout: wave 1 released, nothing reported yet
        play_devices(fleet, factory, rollout_id, "completed", reported=set())
        assert survivor.metric("edgefleet_background_leader") == 1
        assert len(first_wave) == 2
    finally:
        for server in servers:
            server.stop()
    assert actions(factory, rollout_id) == ["create", "start", "advance", "complete"]
