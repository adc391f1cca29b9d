"""Targets that failed for a reason a retry cannot fix, so the agent does not install them again.

A bundle whose golden self-test failed will fail again: the desired state keeps naming it until the
rollout engine reacts, and the agent must not download and roll it back on every poll. Transient
failures (network, a restart mid-download) are not recorded here.
"""

from __future__ import annotations

from pathlib import Path

from bundles.contract import FailedTargets as FailedTargetsFile
from device_agent.statefiles import StateFiles


class FailedTargets:
    """A persisted map ``name@version`` -> reason (damaged: set aside, and the map starts empty)."""

    def __init__(self, path: Path, files: StateFiles | None = None) -> None:
        self.path = path
        self.files = files or StateFiles(path.parent)

    def all(self) -> dict[str, str]:
        found: dict[str, str] = self.files.load(self.path, FailedTargetsFile, {})
        return dict(found)

    def reason(self, ref: str) -> str | None:
        return self.all().get(ref)

    def add(self, ref: str, reason: str) -> None:
        data = self.all()
        if data.get(ref) != reason:
            data[ref] = reason
            self.files.save(self.path, data)

    def discard(self, ref: str) -> None:
        data = self.all()
        if data.pop(ref, None) is not None:
            self.files.save(self.path, data)
