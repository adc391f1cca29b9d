"""Rollout and wave state machines as explicit transition tables.

Every state change goes through :func:`next_rollout_state` or :func:`next_wave_state`, which look the
(state, event) pair up in a table and refuse anything not listed with a readable message, so the
persisted state can never take a path the docs do not show (``docs/rollouts.md`` draws both tables).
State and event names are persisted: they are stable and lowercase.
"""

from __future__ import annotations

from enum import Enum

from fleet_server.errors import ConflictError


class RolloutState(str, Enum):
    """Where a rollout is in its life."""

    DRAFT = "draft"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class RolloutEvent(str, Enum):
    """What can happen to a rollout: operator actions and engine decisions."""

    START = "start"  # draft -> running (no approval needed)
    SUBMIT = "submit"  # draft -> awaiting approval
    APPROVE = "approve"  # operator: start, continue after a wave, or override a breach
    PAUSE = "pause"  # operator
    RESUME = "resume"  # operator
    ABORT = "abort"  # operator: stop advancing, leave devices where they are
    ROLLBACK = "rollback"  # operator or engine (breach with on_breach=rollback)
    BREACH = "breach"  # engine: a gate failed and on_breach=pause, or data stayed insufficient
    WAVE_NEEDS_APPROVAL = "wave_needs_approval"  # engine: a wave passed, approval required to go on
    COMPLETE = "complete"  # engine: the last wave passed


class WaveState(str, Enum):
    """Where one wave is: devices installing (running), all settled and soaking, then a verdict."""

    PENDING = "pending"
    RUNNING = "running"
    SOAKING = "soaking"
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WaveEvent(str, Enum):
    """What can happen to a wave."""

    START = "start"
    SETTLED = "settled"  # every device installed, failed or timed out: the soak clock is what is left
    PASS = "pass"  # noqa: S105 - not a password
    FAIL = "fail"
    CANCEL = "cancel"


R, E = RolloutState, RolloutEvent
ROLLOUT_TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.DRAFT, E.START): R.RUNNING,
    (R.DRAFT, E.SUBMIT): R.AWAITING_APPROVAL,
    (R.DRAFT, E.ABORT): R.ABORTED,
    (R.AWAITING_APPROVAL, E.APPROVE): R.RUNNING,
    (R.AWAITING_APPROVAL, E.ABORT): R.ABORTED,
    (R.AWAITING_APPROVAL, E.ROLLBACK): R.ROLLED_BACK,
    (R.RUNNING, E.PAUSE): R.PAUSED,
    (R.RUNNING, E.BREACH): R.PAUSED,
    (R.RUNNING, E.WAVE_NEEDS_APPROVAL): R.AWAITING_APPROVAL,
    (R.RUNNING, E.COMPLETE): R.COMPLETED,
    (R.RUNNING, E.ABORT): R.ABORTED,
    (R.RUNNING, E.ROLLBACK): R.ROLLED_BACK,
    (R.PAUSED, E.RESUME): R.RUNNING,
    (R.PAUSED, E.APPROVE): R.RUNNING,
    (R.PAUSED, E.ABORT): R.ABORTED,
    (R.PAUSED, E.ROLLBACK): R.ROLLED_BACK,
    (R.COMPLETED, E.ROLLBACK): R.ROLLED_BACK,
    (R.ABORTED, E.ROLLBACK): R.ROLLED_BACK,
}

W, WE = WaveState, WaveEvent
WAVE_TRANSITIONS: dict[tuple[WaveState, WaveEvent], WaveState] = {
    (W.PENDING, WE.START): W.RUNNING,
    (W.PENDING, WE.CANCEL): W.CANCELLED,
    (W.RUNNING, WE.SETTLED): W.SOAKING,
    (W.RUNNING, WE.PASS): W.PASSED,
    (W.RUNNING, WE.FAIL): W.FAILED,
    (W.RUNNING, WE.CANCEL): W.CANCELLED,
    (W.SOAKING, WE.PASS): W.PASSED,
    (W.SOAKING, WE.FAIL): W.FAILED,
    (W.SOAKING, WE.CANCEL): W.CANCELLED,
}

ACTIVE_STATES = frozenset({R.DRAFT, R.AWAITING_APPROVAL, R.RUNNING, R.PAUSED})
"""States in which a rollout holds its devices: another rollout of the same model cannot take them."""

TERMINAL_WAVE_STATES = frozenset({W.PASSED, W.FAILED, W.CANCELLED})
OPERATOR_EVENTS = frozenset({E.START, E.APPROVE, E.PAUSE, E.RESUME, E.ABORT, E.ROLLBACK})
"""Events an operator can ask for (the others are the engine's); error messages list only these."""


class RolloutStateError(ConflictError):
    """The action is not allowed in the rollout's current state (HTTP 409)."""


def next_rollout_state(
    state: RolloutState | str, event: RolloutEvent | str, rollout_id: int | None = None
) -> RolloutState:
    """The state after ``event``; a :class:`RolloutStateError` naming what is allowed otherwise."""
    current, ev = RolloutState(state), RolloutEvent(event)
    target = ROLLOUT_TRANSITIONS.get((current, ev))
    if target is None:
        allowed = sorted(e.value for (s, e) in ROLLOUT_TRANSITIONS if s == current and e in OPERATOR_EVENTS)
        name = f"rollout {rollout_id}" if rollout_id is not None else "the rollout"
        hint = f"allowed: {', '.join(allowed)}" if allowed else "it is finished"
        raise RolloutStateError(f"cannot {ev.value} {name}: it is {current.value} ({hint})")
    return target


def next_wave_state(state: WaveState | str, event: WaveEvent | str) -> WaveState:
    """The wave state after ``event``; an error for a pair the table does not list (an engine bug)."""
    current, ev = WaveState(state), WaveEvent(event)
    target = WAVE_TRANSITIONS.get((current, ev))
    if target is None:
        raise RolloutStateError(f"a wave cannot go from {current.value} on {ev.value}")
    return target


def is_active(state: RolloutState | str) -> bool:
    """Whether a rollout in ``state`` still holds its devices for its model."""
    return RolloutState(state) in ACTIVE_STATES
