"""A server restart mid-rollout resumes exactly where it was (PostgreSQL, as in production).

"Restart" here is everything a new process has: a new engine (connection pool), new sessions, a new
rollout engine object; only the database carries over. The rollout is stopped with devices of wave 2
mid-soak, and must then finish with the same decisions as if nothing had happened, releasing no
device twice and moving no start-after time.
"""

from __future__ import annotations

import threading

import pytest

from fleet_server.db import make_engine, make_session_factory
from fleet_server.rollouts.engine import RolloutEngine
from tests.fleet_server.rollouts.conftest import SOAK_S
from tests.fleet_server.rollouts.fleetsim import Clock
from tests.fleet_server.rollouts.test_engine import actions, released, state

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_restart_mid_rollout_resumes_exactly_where_it_was(database_url, fleet, factory, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    first_process = RolloutEngine(factory, clock=clock)
    first_process.tick()
    for device_id, start in released(factory, rollout_id).items():
        fleet.healthy_device(device_id, 2, start, SOAK_S)
    clock.advance(SOAK_S + 2)
    first_process.tick()  # wave 1 passes, wave 2 starts and releases 9 devices
    wave2 = released(factory, rollout_id)
    halfway = list(wave2)[1:5]
    for device_id in halfway:
        fleet.install(device_id, 2, wave2[device_id])
    clock.advance(60)
    first_process.tick()
    before = state(factory, rollout_id)
    factory.kw["bind"].dispose()  # the old process is gone

    engine = make_engine(database_url)
    try:
        second_process = RolloutEngine(make_session_factory(engine), clock=Clock(clock()))
        restarted = state(factory, rollout_id)
        assert (restarted[0].state, restarted[0].current_wave) == ("running", 1)
        assert [w.state for w in restarted[1]] == ["passed", "running", "pending"]
        assert {d: (r.outcome, r.start_after) for d, r in restarted[3].items()} == {
            d: (r.outcome, r.start_after) for d, r in before[3].items()
        }
        assert sum(1 for r in restarted[3].values() if r.outcome == "soaking") == 4
        second_process.tick()
        assert released(factory, rollout_id) == wave2  # nothing released twice, no start time moved
        for device_id, start in wave2.items():
            fleet.healthy_device(device_id, 2, start, SOAK_S)
        for _ in range(4):
            second_process.clock.advance(SOAK_S + 2)
            second_process.tick()
            for device_id, start in released(factory, rollout_id).items():
                if device_id not in wave2:
                    fleet.healthy_device(device_id, 2, start, SOAK_S)
                    wave2[device_id] = start
        rollout, waves, decisions, _ = state(factory, rollout_id)
        assert rollout.state == "completed" and [w.state for w in waves] == ["passed"] * 3
        assert actions(decisions) == ["create", "start", "advance", "advance", "complete"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_server_processes_ticking_at_once_decide_once(database_url, fleet, factory, clock, create):
    fleet.add_devices(20)
    rollout_id = create(waves="50%,100%")
    RolloutEngine(factory, clock=clock).tick()
    for device_id, start in released(factory, rollout_id).items():
        fleet.healthy_device(device_id, 2, start, SOAK_S)
    clock.advance(SOAK_S + 2)
    engines = [make_engine(database_url) for _ in range(4)]
    try:
        workers = [RolloutEngine(make_session_factory(e), clock=clock) for e in engines]
        barrier = threading.Barrier(len(workers))

        def run(worker: RolloutEngine) -> None:
            barrier.wait()
            worker.tick()

        threads = [threading.Thread(target=run, args=(w,)) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for engine in engines:
            engine.dispose()
    assert actions(state(factory, rollout_id)[2]) == ["create", "start", "advance"]
