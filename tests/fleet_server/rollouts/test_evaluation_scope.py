"""A tick classifies only the devices whose outcome can have changed (new evidence, a timeout come): the outcomes it
keeps are those classifying every device again would give, whatever arrives when (on SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections import Counter

from sqlalchemy import select

from fleet_server.db import session_scope
from fleet_server.models import Device
from fleet_server.rollouts import service
from fleet_server.rollouts.decisions import classify_device
from fleet_server.rollouts.models import Rollout, RolloutDevice, RolloutWave
from fleet_server.rollouts.observe import observation_of
from tests.fleet_server.rollouts.conftest import SOAK_S, TIMEOUT_S

STICKY = ("failed", "timed_out")


def _released(factory, rollout_id) -> dict[str, dt.datetime]:
    with factory() as session:
        query = select(RolloutDevice.device_id, RolloutDevice.start_after).where(
            RolloutDevice.rollout_id == rollout_id, RolloutDevice.released_at.is_not(None)
        )
        return dict(session.execute(query).tuples().all())  # fmt: skip


def _check_against_a_full_reclassification(factory, rollout_id, now) -> int:
    """Every released device's kept outcome (and reason) is what classifying it again now gives, unless it
    is failed or timed out (which stick); the wave's counts are those of its devices. Returns the devices checked."""
    with factory() as session:
        rollout = session.get(Rollout, rollout_id)
        wave = session.scalar(select(RolloutWave).where(RolloutWave.rollout_id == rollout_id,
                                                        RolloutWave.index == rollout.current_wave))  # fmt: skip
        members = list(session.scalars(select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout_id, RolloutDevice.membership == "member")))  # fmt: skip
        polls = dict(session.execute(select(Device.id, Device.last_seen_at)).tuples().all())
        checked = 0
        for device in members:
            if device.start_after is None or device.outcome in STICKY:
                continue
            observation = observation_of(device.device_id, device.start_after, polls.get(device.device_id), False,
                                         running_since=device.running_since, last_report_at=device.last_report_at,
                                         last_on_target_at=device.last_on_target_at,
                                         left_target_at=device.left_target_at, failure=device.failure)  # fmt: skip
            outcome, reason = classify_device(observation, SOAK_S, TIMEOUT_S, now)
            assert (device.outcome, device.outcome_reason) == (outcome.value, reason), device.device_id
            checked += 1
        of_wave = Counter(d.outcome or "waiting" for d in members if d.wave_index == wave.index)
        assert {k: v for k, v in wave.evaluation["devices"].items() if v} == dict(of_wave)
        return checked


def test_outcomes_kept_tick_after_tick_are_those_of_classifying_every_device_again(
    fleet, factory, engine, clock, create
):
    ids = fleet.add_devices(12)
    rollout_id = create(waves="50%,100%", gates=("error_rate<0.5 min=1",))
    engine.tick()
    starts = _released(factory, rollout_id)
    assert len(starts) == 6
    order = sorted(starts)
    late, slow, silent_after = order[0], order[1], order[2]  # the others install at once and report every minute
    checked, outcomes_seen = 0, set()
    for step in range(16):
        now = clock()
        quiet = {late} if step < 4 else set()
        quiet |= {slow} if step % 3 else set()
        quiet |= {silent_after} if step > 2 else set()
        for device_id in set(starts) - quiet:
            if step == 0 or device_id == late and step == 4:
                fleet.install(device_id, 2, now)
            fleet.report(device_id, 2, now, 60, requests=50)
        clock.advance(61)
        engine.tick()
        with factory() as session:
            if session.get(Rollout, rollout_id).state != "running":
                break
        checked += _check_against_a_full_reclassification(factory, rollout_id, clock())
        with factory() as session:
            outcomes_seen |= set(session.scalars(select(RolloutDevice.outcome).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.device_id.in_(ids))))  # fmt: skip
    assert checked >= 40 and {"installing", "soaking", "healthy"} <= outcomes_seen


def test_evidence_folded_while_a_rollout_is_paused_is_classified_when_it_resumes(fleet, factory, engine, clock, create):
    fleet.add_devices(20)
    rollout_id = create()
    engine.tick()
    ((device_id, start),) = _released(factory, rollout_id).items()
    with session_scope(factory) as session:
        service.act(session, rollout_id, "pause", "key:1:alice", now=clock())
    fleet.healthy_device(device_id, 2, start, SOAK_S)
    clock.advance(SOAK_S + 2)
    engine.tick()  # folds the reports; a paused rollout is not evaluated
    with factory() as session:
        assert session.get(RolloutDevice, (rollout_id, device_id)).outcome == "installing"
    with session_scope(factory) as session:
        service.act(session, rollout_id, "resume", "key:1:alice", now=clock())
    engine.tick()
    with factory() as session:
        assert session.get(RolloutDevice, (rollout_id, device_id)).outcome == "healthy"
