"""The update state machine: the transition table IS the specification (after Mender's client).

Running a deployment: the record is persisted in its current state, that state's step runs and
returns an :class:`Event`, :data:`TRANSITIONS` gives the next state, the record is persisted in it,
and so on until ``idle``. A step that raises an edgefleet error (or any ``Exception``) counts as a
``failure`` event with the message kept in the record; a ``BaseException`` (the process dying)
propagates, and the next start calls :meth:`UpdateMachine.resume`, which re-enters at the state
:data:`RESUME` names for the persisted one. Every save counts; past the cap the loop guard posts
``loop-detected`` and the deployment leaves through ``loop-abort`` (roll back, report).

Steps must be idempotent: any of them can run again after a power cut.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from bundles.errors import TransportError
from device_agent.update.record import EXIT_STATES, DeploymentRecord, LoopDetected, LoopExhausted, RecordStore
from device_agent.update.states import DeploymentStatus, Event, UpdateState, next_status

log = logging.getLogger(__name__)

S, E = UpdateState, Event

TRANSITIONS: dict[tuple[UpdateState, Event], UpdateState] = {
    (S.SYNC, E.SUCCESS): S.DOWNLOAD,
    (S.SYNC, E.NOTHING_TO_DO): S.IDLE,
    (S.SYNC, E.FAILURE): S.IDLE,
    (S.DOWNLOAD, E.SUCCESS): S.VERIFY_BUNDLE,
    (S.DOWNLOAD, E.FAILURE): S.CLEANUP,              # nothing changed on the device yet
    (S.VERIFY_BUNDLE, E.SUCCESS): S.STAGE,
    (S.VERIFY_BUNDLE, E.FAILURE): S.CLEANUP,
    (S.STAGE, E.SUCCESS): S.ACTIVATE,
    (S.STAGE, E.FAILURE): S.CLEANUP,                 # inactive slot only: nothing to roll back
    (S.ACTIVATE, E.SUCCESS): S.HEALTH_CHECK,
    (S.ACTIVATE, E.FAILURE): S.CHECK_ROLLBACK,
    (S.HEALTH_CHECK, E.SUCCESS): S.COMMIT,
    (S.HEALTH_CHECK, E.FAILURE): S.CHECK_ROLLBACK,
    (S.HEALTH_CHECK, E.ABORTED): S.CHECK_ROLLBACK,
    (S.COMMIT, E.SUCCESS): S.CLEANUP,
    (S.COMMIT, E.FAILURE): S.CHECK_ROLLBACK,
    (S.CHECK_ROLLBACK, E.SUCCESS): S.ROLLBACK,
    (S.CHECK_ROLLBACK, E.NOTHING_TO_DO): S.FAILURE,  # first install: nothing to roll back to
    (S.CHECK_ROLLBACK, E.FAILURE): S.FAILURE,
    (S.ROLLBACK, E.SUCCESS): S.FAILURE,              # rolled back == the deployment failed
    (S.ROLLBACK, E.FAILURE): S.FAILURE,
    (S.FAILURE, E.SUCCESS): S.CLEANUP,
    (S.FAILURE, E.FAILURE): S.CLEANUP,
    (S.CLEANUP, E.SUCCESS): S.REPORT,
    (S.CLEANUP, E.FAILURE): S.REPORT,
    (S.LOOP_ABORT, E.SUCCESS): S.REPORT,
    (S.LOOP_ABORT, E.FAILURE): S.REPORT,
    (S.REPORT, E.SUCCESS): S.IDLE,
    (S.REPORT, E.FAILURE): S.IDLE,                   # the report stays queued in the outbox
}  # fmt: skip
for _state in UpdateState:
    if _state not in (S.IDLE, S.LOOP_ABORT):
        TRANSITIONS[(_state, E.LOOP_DETECTED)] = S.LOOP_ABORT

RESUME: dict[UpdateState, UpdateState] = {
    S.SYNC: S.CLEANUP,                 # nothing done yet
    S.DOWNLOAD: S.CLEANUP,             # a download changes nothing on the device (the partial file is kept)
    S.VERIFY_BUNDLE: S.CLEANUP,
    S.STAGE: S.CLEANUP,                # the inactive slot is not served
    S.ACTIVATE: S.HEALTH_CHECK,        # the health check first re-does the (idempotent) activation
    S.HEALTH_CHECK: S.HEALTH_CHECK,
    S.COMMIT: S.COMMIT,                # idempotent
    S.CHECK_ROLLBACK: S.CHECK_ROLLBACK,
    S.ROLLBACK: S.ROLLBACK,
    S.FAILURE: S.FAILURE,
    S.CLEANUP: S.CLEANUP,
    S.REPORT: S.REPORT,
    S.LOOP_ABORT: S.LOOP_ABORT,
}  # fmt: skip
"""Where a deployment re-enters after a restart, by the state persisted when the process died.
Anything not listed re-enters at ``check-rollback``."""

INTERRUPTED_BEFORE_CHANGE = frozenset({S.SYNC, S.DOWNLOAD, S.VERIFY_BUNDLE, S.STAGE})

Step = Callable[[DeploymentRecord], Event]


def classify(error: BaseException) -> str:
    """``transient`` when retrying later may help (network, a peer), else ``permanent``."""
    return "transient" if isinstance(error, (TransportError, OSError)) else "permanent"


class UpdateMachine:
    """Runs deployments through :data:`TRANSITIONS`, persisting before every step."""

    def __init__(
        self,
        store: RecordStore,
        steps: Mapping[UpdateState, Step],
        on_transition: Callable[[DeploymentRecord, Event], None] | None = None,
    ) -> None:
        missing = [s.value for s in UpdateState if s is not S.IDLE and s not in steps]
        if missing:
            raise ValueError(f"update machine: no step for state(s) {', '.join(missing)}")
        self.store = store
        self.steps = dict(steps)
        self.on_transition = on_transition

    def deploy(self, record: DeploymentRecord) -> DeploymentRecord:
        """Run a new deployment from ``sync`` to ``idle``; returns the final record."""
        record.state = S.SYNC
        return self._run(record)

    def resume(self) -> DeploymentRecord | None:
        """Finish the deployment a previous process left behind (``None`` if there was none)."""
        record = self.store.load()
        if record is None:
            return None
        persisted = record.state
        record.state = RESUME.get(persisted, S.CHECK_ROLLBACK)
        record.history.append(f"resume:{persisted.value}->{record.state.value}")
        if persisted in INTERRUPTED_BEFORE_CHANGE:
            record.fail(f"the agent stopped during {persisted.value}", kind="transient")
            if record.status is DeploymentStatus.IN_PROGRESS:
                record.status = DeploymentStatus.INTERRUPTED
        log.info("resuming deployment %s from %s at %s", record.ref, persisted.value, record.state.value)
        return self._run(record)

    def _run(self, record: DeploymentRecord) -> DeploymentRecord:
        if not self._persist(record):
            return record
        while record.state is not S.IDLE:
            event = self._run_step(record)
            self._advance(record, event)
            if not self._persist_unless_idle(record):
                return record
        self._clear()
        return record

    def _run_step(self, record: DeploymentRecord) -> Event:
        try:
            return self.steps[record.state](record)
        except Exception as e:  # a failing step must never stop the machine: it becomes a failure event
            log.warning("update %s: %s failed: %s", record.ref, record.state.value, e)
            record.fail(f"{record.state.value}: {e}", kind=classify(e))
            return E.FAILURE

    def _advance(self, record: DeploymentRecord, event: Event) -> None:
        key = (record.state, event)
        if key not in TRANSITIONS:
            record.fail(f"{record.state.value}: no transition for event {event.value}")
            key = (record.state, E.FAILURE)
        record.status = next_status(record.status, record.state, event)
        record.history.append(f"{record.state.value}:{event.value}")
        if self.on_transition is not None:
            self.on_transition(record, event)
        record.state = TRANSITIONS[key]

    def _persist_unless_idle(self, record: DeploymentRecord) -> bool:
        return record.state is S.IDLE or self._persist(record)

    def _persist(self, record: DeploymentRecord) -> bool:
        """Save before the step runs; on loop detection divert to ``loop-abort``.

        Returns False when the record had to be abandoned (the way out itself keeps crashing).
        """
        try:
            self.store.save(record)
        except LoopDetected as e:
            log.error("update %s: %s", record.ref, e)
            record.fail(str(e))
            self._advance(record, E.LOOP_DETECTED)
            return self._persist(record)
        except LoopExhausted as e:
            log.error("update %s: abandoned: %s", record.ref, e)
            record.fail(str(e))
            self._clear()
            return False
        except OSError as e:  # as Mender: a state that cannot be saved fails, the way out carries on
            log.error("update %s: cannot save the deployment record in %s: %s", record.ref, record.state.value, e)
            record.fail(f"cannot save the deployment record: {e}", kind="transient")
            if record.state in EXIT_STATES:
                return True
            self._advance(record, E.FAILURE)
            return self._persist_unless_idle(record)
        return True

    def _clear(self) -> None:
        try:
            self.store.clear()
        except OSError as e:
            log.error("cannot remove the deployment record: %s", e)


def _mermaid_id(state: UpdateState) -> str:
    return "[*]" if state is S.IDLE else state.value.replace("-", "_")


def mermaid() -> str:
    """The transition table as a Mermaid state diagram (docs/agent.md embeds it; a test keeps it current)."""
    lines = ["stateDiagram-v2", "    [*] --> sync"]
    for (state, event), target in TRANSITIONS.items():
        if event is not E.LOOP_DETECTED:
            lines.append(f"    {_mermaid_id(state)} --> {_mermaid_id(target)}: {event.value}")
    lines.append("    note right of loop_abort: every state but idle goes here on loop-detected")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - prints the diagram for docs/agent.md
    import sys

    sys.stdout.write(mermaid() + "\n")
