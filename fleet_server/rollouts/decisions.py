"""Per-device outcomes and the wave decision, as pure functions of observations and the clock.

A device released into a wave goes ``installing`` -> ``soaking`` (it reports running the new bundle)
-> ``healthy`` (it has reported again after running it for the whole soak). It is ``failed`` if it
reports a failed install or stops running the bundle (the agent rolled back by itself), and
``timed_out`` if it is not healthy by ``start + soak + device_timeout`` (it went silent, or never
installed): hawkBit #3185 (success counted before the device ran the update) and #693 (no timeout)
cannot happen here, because "installed" alone never counts and every device settles by a deadline.

:func:`decide` turns a wave's progress and gate results into one :class:`Decision` carrying the
numbers that drove it: a breached gate acts at once (roll back or pause, per policy); otherwise the
wave waits until every device has settled and every gate has enough data, then advances, asks for
approval, or completes the rollout. Gates still short of data when the wave's deadline has passed
pause the rollout rather than wait forever.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fleet_server.rollouts.gates import GateResult
from fleet_server.rollouts.spec import RolloutPolicy


class DeviceOutcome(str, Enum):
    """A device's progress in its wave (persisted)."""

    WAITING = "waiting"  # in the wave, not yet told to download (download pacing)
    INSTALLING = "installing"
    SOAKING = "soaking"
    HEALTHY = "healthy"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


SETTLED = frozenset({DeviceOutcome.HEALTHY, DeviceOutcome.FAILED, DeviceOutcome.TIMED_OUT})
IN_FLIGHT = frozenset({DeviceOutcome.INSTALLING})


class Action(str, Enum):
    """What the engine (or an operator) decided (persisted)."""

    WAIT = "wait"
    ADVANCE = "advance"
    PAUSE_FOR_APPROVAL = "pause_for_approval"
    PAUSE_ON_BREACH = "pause_on_breach"
    PAUSE_NO_DATA = "pause_no_data"
    ROLLBACK = "rollback"
    COMPLETE = "complete"


@dataclass(frozen=True)
class DeviceObservation:
    """What the server knows about one device of a wave, from inventory and telemetry."""

    device_id: str
    started_at: dt.datetime | None  # when it was allowed to start (release time + jitter); None: not released
    running_since: dt.datetime | None = None  # first seen running the target bundle (active or shadow)
    running_now: bool = False  # its latest report still runs the target bundle
    failure: str | None = None  # a reported install failure or on-device rollback
    last_seen_at: dt.datetime | None = None


def classify_device(
    obs: DeviceObservation, soak_s: float, device_timeout_s: float, now: dt.datetime
) -> tuple[DeviceOutcome, str]:
    """The device's outcome now, with a short reason shown to the operator."""
    if obs.started_at is None:
        return DeviceOutcome.WAITING, "waiting for a download slot"
    if obs.failure:
        return DeviceOutcome.FAILED, obs.failure
    if obs.running_since is not None and not obs.running_now:
        return DeviceOutcome.FAILED, "stopped running the new bundle (rolled back on the device)"
    soak = dt.timedelta(seconds=soak_s)
    if obs.running_since is not None and obs.last_seen_at is not None and obs.last_seen_at >= obs.running_since + soak:
        return DeviceOutcome.HEALTHY, f"ran the new bundle through the {soak_s:g} s soak"
    if now >= obs.started_at + soak + dt.timedelta(seconds=device_timeout_s):
        return DeviceOutcome.TIMED_OUT, _timeout_reason(obs, now)
    if obs.running_since is not None:
        return DeviceOutcome.SOAKING, "running the new bundle, soaking"
    return DeviceOutcome.INSTALLING, "told to install, not running it yet"


def _timeout_reason(obs: DeviceObservation, now: dt.datetime) -> str:
    if obs.last_seen_at is None:
        return "never reported"
    silent_s = (now - obs.last_seen_at).total_seconds()
    state = "running the new bundle" if obs.running_since else "without installing the new bundle"
    return f"silent for {silent_s:.0f} s {state}"


@dataclass(frozen=True)
class WaveProgress:
    """A wave's device outcomes and clock, the input of :func:`decide`."""

    index: int
    is_last: bool
    outcomes: Mapping[DeviceOutcome, int]
    deadline_passed: bool

    @property
    def devices_total(self) -> int:
        """Devices in the wave."""
        return sum(self.outcomes.values())

    @property
    def unsettled(self) -> int:
        """Devices still waiting, installing or soaking."""
        return sum(n for o, n in self.outcomes.items() if o not in SETTLED)

    def counts(self) -> dict[str, int]:
        """Outcome counts by persisted name, every outcome present."""
        return {o.value: int(self.outcomes.get(o, 0)) for o in DeviceOutcome}


@dataclass(frozen=True)
class Decision:
    """One decision with the numbers behind it: persisted as a decision record when it acts."""

    action: Action
    wave_index: int
    reason: str
    gates: tuple[GateResult, ...] = ()
    devices: dict[str, int] = field(default_factory=dict)

    @property
    def acts(self) -> bool:
        """Whether the decision changes anything (``wait`` is shown, not recorded)."""
        return self.action is not Action.WAIT

    def to_dict(self) -> dict[str, Any]:
        """JSON form (persisted keys)."""
        return {
            "action": self.action.value,
            "wave_index": self.wave_index,
            "reason": self.reason,
            "gates": [g.to_dict() for g in self.gates],
            "devices": dict(self.devices),
        }


def decide(progress: WaveProgress, results: Sequence[GateResult], policy: RolloutPolicy) -> Decision:
    """The engine's decision for the running wave."""
    gates, devices = tuple(results), progress.counts()

    def make(action: Action, reason: str) -> Decision:
        return Decision(action, progress.index, reason, gates, devices)

    if progress.devices_total == 0:
        return make(_pass_action(progress, policy), "no devices in this wave")
    failed = [r for r in results if r.status == "fail"]
    if failed:
        action = Action.ROLLBACK if policy.on_breach == "rollback" else Action.PAUSE_ON_BREACH
        return make(action, "gate breached: " + "; ".join(r.reason for r in failed))
    if progress.unsettled:
        return make(Action.WAIT, f"{progress.unsettled} of {progress.devices_total} devices not settled yet")
    waiting = [r for r in results if r.status == "wait"]
    if waiting:
        detail = "; ".join(f"{r.gate}: {r.reason}" for r in waiting)
        if progress.deadline_passed:
            return make(Action.PAUSE_NO_DATA, "insufficient data by the wave's deadline: " + detail)
        return make(Action.WAIT, "waiting for data: " + detail)
    summary = ", ".join(r.reason for r in results)
    return make(_pass_action(progress, policy), f"wave {progress.index + 1} passed: {summary}")


def _pass_action(progress: WaveProgress, policy: RolloutPolicy) -> Action:
    if progress.is_last:
        return Action.COMPLETE
    return Action.PAUSE_FOR_APPROVAL if policy.approval == "each_wave" else Action.ADVANCE
