"""Retry schedule for deployments that failed before they changed the device.

A bundle that fails to download, verify or unpack (``sync``, ``download``, ``verify-bundle`` or
``stage`` failed) changed nothing on the device, so it may well succeed later: a network cut, a full
disk, a server that served a bad copy. It is retried, but not on every poll: the n-th consecutive
failure of the same desired target waits ``initial * 2**(n-1)`` seconds (capped at ``max_s``), with
jitter over the upper half so that a fleet does not retry in step. A new desired target for the
model (another version, variant or manifest target) starts the count again, and so does success.

Failures after activation (the bundle ran and failed its health check) are not retried at all:
:class:`device_agent.failed.FailedTargets` remembers them. A bundle with no variant this device
can run is remembered there too (retrying cannot change the signed manifest).

The schedule is a small JSON file (``<state_dir>/retry.json``), model -> ``{target, failures,
next_at, error}`` (``bundles.contract.RetryEntry``), read through ``device_agent.statefiles`` (a
damaged one is set aside: the schedule starts empty), so a restart does not reset it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bundles.contract import RetryEntry, to_dict
from bundles.contract import RetrySchedule as RetryScheduleFile
from device_agent.statefiles import StateFiles
from device_agent.update.record import DeploymentRecord
from device_agent.update.states import DeploymentStatus

FETCH_STATES = ("sync", "download", "verify-bundle", "stage")
"""States whose failure leaves the device as it was: such a deployment is retried with backoff."""


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter over the upper half: 5, 10, 20 ... up to ``max_s`` seconds."""
    ceiling = min(max_s, initial_s * 2 ** max(failures - 1, 0))
    return float(ceiling / 2 + random.uniform(0.0, ceiling / 2))


def desired_target(entry: Any) -> str:
    """What a desired-state entry (``DesiredModel`` or its dict) asks for, as one comparable string."""
    data: Mapping[str, Any] = entry if isinstance(entry, Mapping) else to_dict(entry)
    return f"{data.get('name')}@{data.get('version')}/{data.get('variant') or '*'}/{data.get('manifest_target')}"


def failed_before_change(record: DeploymentRecord) -> bool:
    """Did the deployment fail in a state that had not touched the slots yet (and can retrying help)?"""
    if record.status is not DeploymentStatus.FAILED:  # incompatible, rolled back, installed...
        return False
    return any(step.split(":", 1) == [state, "failure"] for step in record.history for state in FETCH_STATES)


class RetrySchedule:
    """When each model's failing target may be tried again (persisted)."""

    def __init__(
        self, path: Path, initial_s: float, max_s: float, clock: Callable[[], float] = time.time,
        files: StateFiles | None = None,
    ) -> None:  # fmt: skip
        self.path, self.initial_s, self.max_s, self.clock = path, initial_s, max_s, clock
        self.files = files or StateFiles(path.parent)

    def _load(self) -> dict[str, RetryEntry]:
        found: dict[str, RetryEntry] = self.files.load(self.path, RetryScheduleFile, {})
        return dict(found)

    def _save(self, data: dict[str, RetryEntry]) -> None:
        self.files.save(self.path, data, mode=0o600)

    def wait_s(self, model: str, target: str) -> float:
        """Seconds before ``target`` may be tried again for ``model`` (0: now). A new target resets."""
        entry = self._load().get(model)
        if entry is None or entry.target != target:
            return 0.0
        return max(0.0, entry.next_at - self.clock())

    def failed(self, model: str, target: str, error: str | None) -> float:
        """Count one more failure of ``target``; returns the delay before the next try."""
        data = self._load()
        previous = data.get(model)
        failures = previous.failures + 1 if previous is not None and previous.target == target else 1
        delay_s = backoff_s(failures, self.initial_s, self.max_s)
        data[model] = RetryEntry(target[:1000], failures, self.clock() + delay_s, (error or "")[:500])
        self._save(data)
        return delay_s

    def clear(self, model: str) -> None:
        """Forget ``model``'s failures (it succeeded, or it is asked for something else)."""
        data = self._load()
        if data.pop(model, None) is not None:
            self._save(data)

    def failures(self, model: str) -> int:
        """Consecutive failures counted for ``model``'s current target."""
        entry = self._load().get(model)
        return 0 if entry is None else entry.failures
