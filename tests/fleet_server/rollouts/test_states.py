"""The rollout and wave state machines: every listed transition works, everything else is refused."""

import pytest

from fleet_server.errors import ConflictError
from fleet_server.rollouts.states import (
    ROLLOUT_TRANSITIONS,
    WAVE_TRANSITIONS,
    RolloutEvent,
    RolloutState,
    RolloutStateError,
    WaveEvent,
    WaveState,
    is_active,
    next_rollout_state,
    next_wave_state,
)

R, E = RolloutState, RolloutEvent


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (R.DRAFT, E.START, R.RUNNING),
        (R.DRAFT, E.SUBMIT, R.AWAITING_APPROVAL),
        (R.AWAITING_APPROVAL, E.APPROVE, R.RUNNING),
        (R.RUNNING, E.PAUSE, R.PAUSED),
        (R.RUNNING, E.BREACH, R.PAUSED),
        (R.RUNNING, E.WAVE_NEEDS_APPROVAL, R.AWAITING_APPROVAL),
        (R.RUNNING, E.COMPLETE, R.COMPLETED),
        (R.RUNNING, E.ROLLBACK, R.ROLLED_BACK),
        (R.PAUSED, E.RESUME, R.RUNNING),
        (R.PAUSED, E.APPROVE, R.RUNNING),
        (R.PAUSED, E.ABORT, R.ABORTED),
        (R.COMPLETED, E.ROLLBACK, R.ROLLED_BACK),
        (R.ABORTED, E.ROLLBACK, R.ROLLED_BACK),
    ],
)
def test_listed_rollout_transitions_lead_where_the_table_says(state, event, expected):
    assert next_rollout_state(state.value, event.value) is expected


def test_every_unlisted_rollout_transition_is_refused_with_the_allowed_events():
    for state in RolloutState:
        for event in RolloutEvent:
            if (state, event) in ROLLOUT_TRANSITIONS:
                continue
            with pytest.raises(RolloutStateError) as info:
                next_rollout_state(state, event, rollout_id=17)
            assert f"cannot {event.value} rollout 17: it is {state.value}" in str(info.value)


def test_state_errors_are_conflicts_so_the_api_answers_409():
    with pytest.raises(ConflictError):
        next_rollout_state(R.COMPLETED, E.RESUME)


def test_rolled_back_is_terminal():
    assert not [e for (s, e) in ROLLOUT_TRANSITIONS if s is R.ROLLED_BACK]
    with pytest.raises(RolloutStateError, match="it is finished"):
        next_rollout_state(R.ROLLED_BACK, E.ROLLBACK)


def test_only_unfinished_rollouts_hold_their_devices():
    assert {s for s in RolloutState if is_active(s)} == {R.DRAFT, R.AWAITING_APPROVAL, R.RUNNING, R.PAUSED}


def test_wave_goes_pending_running_soaking_passed():
    state = WaveState.PENDING
    for event in (WaveEvent.START, WaveEvent.SETTLED, WaveEvent.PASS):
        state = next_wave_state(state, event)
    assert state is WaveState.PASSED


def test_wave_can_fail_before_settling_but_a_finished_wave_cannot_move():
    assert next_wave_state(WaveState.RUNNING, WaveEvent.FAIL) is WaveState.FAILED
    for final in (WaveState.PASSED, WaveState.FAILED, WaveState.CANCELLED):
        assert not [e for (s, e) in WAVE_TRANSITIONS if s is final]
        with pytest.raises(RolloutStateError):
            next_wave_state(final, WaveEvent.START)


def test_persisted_names_are_stable_lowercase():
    names = [m.value for enum in (RolloutState, RolloutEvent, WaveState, WaveEvent) for m in enum]
    assert all(n == n.lower() and " " not in n for n in names)
    assert R.AWAITING_APPROVAL.value == "awaiting_approval" and R.ROLLED_BACK.value == "rolled_back"


def test_refusal_lists_only_what_an_operator_can_do():
    with pytest.raises(RolloutStateError) as info:
        next_rollout_state(R.RUNNING, E.RESUME, rollout_id=17)
    assert str(info.value) == "cannot resume rollout 17: it is running (allowed: abort, pause, rollback)"
