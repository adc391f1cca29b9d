"""Per-device outcomes through the soak, and the wave decision."""

import datetime as dt

import pytest

from fleet_server.rollouts.decisions import (
    Action,
    DeviceObservation,
    DeviceOutcome,
    WaveProgress,
    classify_device,
    decide,
)
from fleet_server.rollouts.gates import CohortFigures, Gate, evaluate_gate
from fleet_server.rollouts.spec import RolloutPolicy

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SOAK, TIMEOUT = 600.0, 300.0


def at(seconds):
    return T0 + dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("obs", "now_s", "outcome"),
    [
        (DeviceObservation("d", None), 5000, DeviceOutcome.WAITING),
        (DeviceObservation("d", T0, last_seen_at=at(10)), 10, DeviceOutcome.INSTALLING),
        (
            DeviceObservation("d", T0, running_since=at(10), running_now=True, last_seen_at=at(10)),
            20,
            DeviceOutcome.SOAKING,
        ),
        # healthy only once it reports again after a full soak on the new bundle
        (
            DeviceObservation("d", T0, running_since=at(10), running_now=True, last_seen_at=at(609)),
            609,
            DeviceOutcome.SOAKING,
        ),
        (
            DeviceObservation("d", T0, running_since=at(10), running_now=True, last_seen_at=at(610)),
            610,
            DeviceOutcome.HEALTHY,
        ),
        (DeviceObservation("d", T0, failure="self-test failed"), 10, DeviceOutcome.FAILED),
        (
            DeviceObservation("d", T0, running_since=at(10), running_now=False, last_seen_at=at(700)),
            700,
            DeviceOutcome.FAILED,
        ),
        # silent: timed out at start + soak + timeout, not a second earlier
        (DeviceObservation("d", T0, last_seen_at=at(1)), 899, DeviceOutcome.INSTALLING),
        (DeviceObservation("d", T0, last_seen_at=at(1)), 900, DeviceOutcome.TIMED_OUT),
        (
            DeviceObservation("d", T0, running_since=at(10), running_now=True, last_seen_at=at(100)),
            900,
            DeviceOutcome.TIMED_OUT,
        ),
        (DeviceObservation("d", T0), 900, DeviceOutcome.TIMED_OUT),
    ],
)
def test_device_outcomes(obs, now_s, outcome):
    assert classify_device(obs, SOAK, TIMEOUT, at(now_s))[0] is outcome


def test_timeout_reason_says_how_long_the_device_was_silent():
    obs = DeviceObservation("d", T0, running_since=at(10), running_now=True, last_seen_at=at(100))
    assert classify_device(obs, SOAK, TIMEOUT, at(900))[1] == "silent for 800 s running the new bundle"
    assert classify_device(DeviceObservation("d", T0), SOAK, TIMEOUT, at(900))[1] == "never reported"


def progress(index=0, is_last=False, deadline_passed=False, **counts):
    return WaveProgress(index, is_last, {DeviceOutcome(k): v for k, v in counts.items()}, deadline_passed)


def results(*pairs):
    return [evaluate_gate(Gate.parse(text), fig) for text, fig in pairs]


GOOD = ("error_rate<0.01", CohortFigures(requests=1000, errors=1))
BAD = ("error_rate<0.01", CohortFigures(requests=1000, errors=50))
THIN = ("error_rate<0.01", CohortFigures(requests=10))


@pytest.mark.parametrize(
    ("prog", "gates", "policy", "action"),
    [
        (progress(healthy=5), [GOOD], RolloutPolicy(), Action.ADVANCE),
        (progress(healthy=5, is_last=True), [GOOD], RolloutPolicy(), Action.COMPLETE),
        (progress(healthy=5), [GOOD], RolloutPolicy(approval="each_wave"), Action.PAUSE_FOR_APPROVAL),
        (progress(healthy=5, is_last=True), [GOOD], RolloutPolicy(approval="each_wave"), Action.COMPLETE),
        # a breach acts at once, even with devices still soaking
        (progress(soaking=4, healthy=1), [BAD], RolloutPolicy(), Action.ROLLBACK),
        (progress(soaking=4, healthy=1), [BAD], RolloutPolicy(on_breach="pause"), Action.PAUSE_ON_BREACH),
        (progress(soaking=1, healthy=4), [GOOD], RolloutPolicy(), Action.WAIT),
        (progress(waiting=1, healthy=4), [GOOD], RolloutPolicy(), Action.WAIT),
        # insufficient data waits, and pauses (never passes) once the deadline has gone by
        (progress(healthy=5), [THIN], RolloutPolicy(), Action.WAIT),
        (progress(healthy=5, deadline_passed=True), [THIN], RolloutPolicy(), Action.PAUSE_NO_DATA),
        (progress(), [], RolloutPolicy(), Action.ADVANCE),
    ],
)
def test_wave_decisions(prog, gates, policy, action):
    assert decide(prog, results(*gates), policy).action is action


def test_rollback_decision_names_the_breached_gate_and_its_figures():
    decision = decide(progress(healthy=1), results(GOOD, BAD), RolloutPolicy())
    assert decision.action is Action.ROLLBACK and decision.acts
    assert decision.reason == "gate breached: error_rate=0.05 breached <0.01 over 1000 requests"
    record = decision.to_dict()
    assert record["devices"]["healthy"] == 1 and record["devices"]["timed_out"] == 0
    assert [g["status"] for g in record["gates"]] == ["pass", "fail"]


def test_a_wait_does_not_act():
    assert not decide(progress(soaking=1), results(GOOD), RolloutPolicy()).acts
