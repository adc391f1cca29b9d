"""Targets that failed for a reason a retry cannot fix, so the agent does not install them again.

A bundle whose golden self-test failed will fail again: the desired state keeps naming it until the
rollout engine reacts, and the agent must not download and roll it back on every poll. Transient
failures (network, a restart mid-download) are not recorded here.
"""

from __future__ import annotations

from pathlib import Path

from device_agent.persist import atomic_write_json, read_json


class FailedTargets:
    """A persisted map ``name@version`` -> reason."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> dict[str, str]:
        data = read_json(self.path)
        return dict(data) if isinstance(data, dict) else {}

    def reason(self, ref: str) -> str | None:
        return self.all().get(ref)

    def add(self, ref: str, reason: str) -> None:
        data = self.all()
        if data.get(ref) != reason:
            data[ref] = reason
            atomic_write_json(self.path, data)

    def discard(self, ref: str) -> None:
        data = self.all()
        if data.pop(ref, None) is not None:
            atomic_write_json(self.path, data)
