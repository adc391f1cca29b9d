"""Deterministic cohorts and download pacing.

Each target device gets a position in [0, 1) from ``sha256(rollout id, device id)``. Devices are
ordered by that position, and wave k holds the devices whose rank falls under its cumulative size
(``ceil(share * N)``, at least one device). This is "devices whose hash is below the wave's cumulative
fraction" with exact sizes: a 1% wave on 20 devices has one device instead of, most of the time, none
(hawkBit #1770: groups with no targets got stuck). The same rollout id and the same target set always
give the same cohorts, on any server process, after any restart.

Download pacing: a device released into a wave gets ``start_after = released_at + jitter``, where the
jitter is the device's own position (another hash) times the rollout's ``jitter_s``: spread, and the
same on every tick, so re-running a tick never moves a device's start time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence

from fleet_server.rollouts.spec import WaveSpec


def cohort_position(device_id: str, rollout_id: int, salt: str = "cohort") -> float:
    """A stable pseudo-random number in [0, 1) for this device in this rollout."""
    digest = hashlib.sha256(f"{salt}:{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def order_devices(device_ids: Iterable[str], rollout_id: int) -> list[str]:
    """Devices in cohort order (by position, device id breaking the astronomically rare ties)."""
    return sorted(set(device_ids), key=lambda d: (cohort_position(d, rollout_id), d))


def plan_cohorts(device_ids: Iterable[str], rollout_id: int, waves: Sequence[WaveSpec]) -> list[list[str]]:
    """The devices newly included by each wave; a wave that adds no device gets an empty list."""
    ordered = order_devices(device_ids, rollout_id)
    cohorts: list[list[str]] = []
    done = 0
    for wave in waves:
        size = max(done, wave.cumulative_size(len(ordered)))
        cohorts.append(ordered[done:size])
        done = size
    return cohorts


def start_after(device_id: str, rollout_id: int, released_at: dt.datetime, jitter_s: float) -> dt.datetime:
    """When a released device may start downloading: its release time plus its own stable jitter."""
    jitter = cohort_position(device_id, rollout_id, salt="jitter") * max(0.0, jitter_s)
    return released_at + dt.timedelta(seconds=jitter)


def release_quota(in_flight: int, waiting: int, max_concurrent: int | None) -> int:
    """How many more devices of a wave may be told to download now under the concurrency cap."""
    if max_concurrent is None:
        return waiting
    return max(0, min(waiting, max_concurrent - in_flight))
