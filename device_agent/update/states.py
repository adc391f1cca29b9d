"""States, events and the deployment status of the update state machine.

The enum *values* are written to disk in the deployment record and sent in install reports: they
are stable lowercase strings and must never be renamed, even if the Python names change.
"""

from __future__ import annotations

import enum


class Event(str, enum.Enum):
    """What a step says happened; the transition table maps (state, event) to the next state."""

    SUCCESS = "success"
    FAILURE = "failure"
    NOTHING_TO_DO = "nothing-to-do"
    ABORTED = "aborted"
    LOOP_DETECTED = "loop-detected"


class UpdateState(str, enum.Enum):
    """A state of one deployment (persisted)."""

    IDLE = "idle"
    SYNC = "sync"
    DOWNLOAD = "download"
    VERIFY_BUNDLE = "verify-bundle"
    STAGE = "stage"
    ACTIVATE = "activate"
    HEALTH_CHECK = "health-check"
    COMMIT = "commit"
    CHECK_ROLLBACK = "check-rollback"
    ROLLBACK = "rollback"
    FAILURE = "failure"
    CLEANUP = "cleanup"
    REPORT = "report"
    LOOP_ABORT = "loop-abort"


class DeploymentStatus(str, enum.Enum):
    """The outcome reported to the server (persisted; the ``status`` of an install event)."""

    IN_PROGRESS = "in-progress"
    UP_TO_DATE = "up-to-date"
    INSTALLED = "installed"
    FAILED = "failed"
    INCOMPATIBLE = "incompatible"
    INTERRUPTED = "interrupted"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"
    LOOP_DETECTED = "loop-detected"


S, E, D = UpdateState, Event, DeploymentStatus

_STATUS_AFTER: dict[tuple[UpdateState, Event], DeploymentStatus] = {
    (S.SYNC, E.NOTHING_TO_DO): D.UP_TO_DATE,
    (S.COMMIT, E.SUCCESS): D.INSTALLED,
    (S.ROLLBACK, E.SUCCESS): D.ROLLED_BACK,
    (S.ROLLBACK, E.FAILURE): D.ROLLBACK_FAILED,
}


def next_status(status: DeploymentStatus, state: UpdateState, event: Event) -> DeploymentStatus:
    """The deployment status after ``event`` in ``state`` (a pure reducer, no flags elsewhere).

    Once a rollback has happened (or failed) the status keeps saying so, and a loop detection is
    never hidden; a plain failure only replaces a status that was still in progress.
    """
    if event is E.LOOP_DETECTED:
        return D.LOOP_DETECTED
    if status in (D.ROLLBACK_FAILED, D.LOOP_DETECTED, D.INCOMPATIBLE, D.INTERRUPTED):
        return status
    if status is D.ROLLED_BACK and state is not S.ROLLBACK:
        return status
    if (state, event) in _STATUS_AFTER:
        return _STATUS_AFTER[(state, event)]
    if event is E.FAILURE and status is D.IN_PROGRESS:
        return D.FAILED
    return status
