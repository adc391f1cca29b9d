"""The deployment record: everything the update machine needs to resume after a power cut.

The record is saved atomically (temp file, fsync, ``os.replace``, fsync of the directory) before the
machine enters each state, so the state on disk is always the step that was about to run. Each save
counts in ``store_count``; the loop guard (:class:`LoopDetected`) fires when a deployment has been
saved more often than a healthy one ever could be, which is how a device that crashes in the same
step on every boot gets out.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.contract import parse
from device_agent.statefiles import StateFiles
from device_agent.update.states import DeploymentStatus, UpdateState

EXIT_STATES = frozenset(
    {UpdateState.LOOP_ABORT, UpdateState.ROLLBACK, UpdateState.FAILURE, UpdateState.CLEANUP, UpdateState.REPORT}
)
"""States on the way out of a deployment: the loop guard lets them run past the cap (up to twice it)."""


class LoopDetected(Exception):
    """A deployment was saved more than the cap allows: force the failure path."""


class LoopExhausted(Exception):
    """Even the failure path keeps crashing: abandon the record (the slots stay as committed)."""


@dataclass
class DeploymentRecord:
    """One deployment of one model version (persisted keys are stable and lowercase)."""

    deployment_id: str
    model: str
    version: int
    manifest_target: str
    rollout_id: int | None = None
    variant: str | None = None  # requested by the server (None: the device selects)
    state: UpdateState = UpdateState.SYNC
    status: DeploymentStatus = DeploymentStatus.IN_PROGRESS
    store_count: int = 0
    slot: str | None = None  # the slot being installed into
    previous_slot: str | None = None  # the committed slot to roll back to
    previous_version: int | None = None
    selected_variant: str | None = None
    selected_runtime: str | None = None  # the runtime the variant was validated on and will run on here
    selected_runtime_version: str | None = None
    manifest_sha256: str | None = None
    archive_path: str | None = None
    error: str | None = None
    error_kind: str | None = None  # "transient" (retry later) or "permanent" (never retry these bytes)
    history: list[str] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def new(cls, model: str, version: int, manifest_target: str, **kwargs: Any) -> DeploymentRecord:
        """A fresh record in state ``sync`` with a new deployment id."""
        return cls(
            deployment_id=uuid.uuid4().hex, model=model, version=version, manifest_target=manifest_target, **kwargs
        )

    @property
    def ref(self) -> str:
        """``name@version`` of the target."""
        return f"{self.model}@{self.version}"

    def fail(self, error: str, kind: str = "permanent") -> None:
        """Remember why the deployment failed (the first cause wins: later ones are consequences)."""
        if self.error is None:
            self.error, self.error_kind = error, kind

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"], data["status"] = self.state.value, self.status.value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentRecord:
        """Read a persisted record, every field type-checked (:func:`bundles.contract.parse`).

        An unknown state string (written by a newer agent) re-enters at ``check-rollback``.
        Raises :class:`~bundles.errors.ContractError` for anything that is not a record.
        """
        if isinstance(data, dict) and isinstance(data.get("state"), str):
            if data["state"] not in {s.value for s in UpdateState}:
                error = data.get("error") or f"unknown persisted state '{data['state']}'"
                data = {**data, "state": UpdateState.CHECK_ROLLBACK.value, "error": error}
        record: DeploymentRecord = parse(cls, data, "deployment.json")
        return record


class RecordStore:
    """Loads and saves the one deployment record, enforcing the loop guard on every save."""

    def __init__(self, path: Path, max_saves: int = 28, files: StateFiles | None = None) -> None:
        self.path = path
        self.max_saves = max_saves
        self.files = files or StateFiles(path.parent)

    def load(self) -> DeploymentRecord | None:
        """The persisted record, or ``None`` when no deployment is in progress.

        A damaged record is set aside: the slots are then settled to the committed one and the
        target is deployed again at the next poll (a partial download resumes).
        """
        found: DeploymentRecord | None = self.files.load(
            self.path,
            DeploymentRecord,
            None,
            action="no deployment resumed; the committed slot is served",
            parser=DeploymentRecord.from_dict,
        )
        return found

    def save(self, record: DeploymentRecord) -> None:
        """Count and persist ``record``.

        Raises:
            LoopDetected: the cap is exceeded in a state that is not on the way out.
            LoopExhausted: even the way out has been saved twice the cap.
        """
        record.store_count += 1
        if record.store_count > 2 * self.max_saves:
            raise LoopExhausted(f"deployment {record.ref} saved {record.store_count} times")
        if record.store_count > self.max_saves and record.state not in EXIT_STATES:
            raise LoopDetected(
                f"deployment {record.ref} saved {record.store_count} times (now in {record.state.value})"
            )
        self.files.save(self.path, record.to_dict(), mode=0o600)

    def clear(self) -> None:
        """The deployment is over: remove the record durably."""
        self.files.remove(self.path)
