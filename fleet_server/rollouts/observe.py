"""What the server knows about each released device of a wave, read from stored telemetry.

Sources (shapes in ``docs/telemetry.md``): ``install`` events (``result`` installed / failed /
rolled_back for ``version``), ``heartbeat`` events (``models``: name, version, state) and metric
windows (one per model version the device served). A device is *running* the target once it reports
an ``installed`` event for it, serves windows on it, or lists it in a heartbeat; it stops running it
when a later window or heartbeat shows another version active (the agent rolled back by itself). Its
*last report* on the target (for the soak) is the end of its latest window or heartbeat on it.

For a shadow wave the device keeps serving its active version and runs the target beside it, so only
install events and heartbeats say it runs the shadow, and any later report counts as a report.
Events dated before the device was released (minus a clock-skew allowance) are ignored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.models import Device, DeviceEvent, MetricWindow
from fleet_server.rollouts.decisions import DeviceObservation

CLOCK_SKEW_S = 300.0
FAILED_RESULTS = frozenset({"failed", "rolled_back"})
RUNNING_STATES = frozenset({"active", "trial", "shadow"})


@dataclass
class _Evidence:
    """Everything found for one device, folded into an observation at the end."""

    start: dt.datetime
    running_since: dt.datetime | None = None
    last_on_target: dt.datetime | None = None
    last_report: dt.datetime | None = None
    left_target_at: dt.datetime | None = None
    failure: str | None = None
    failure_at: dt.datetime | None = None
    windows: dict[int, tuple[dt.datetime, dt.datetime]] = field(default_factory=dict)

    def running(self, at: dt.datetime) -> None:
        self.running_since = at if self.running_since is None else min(self.running_since, at)

    def seen_on_target(self, at: dt.datetime) -> None:
        self.last_on_target = at if self.last_on_target is None else max(self.last_on_target, at)
        self.seen(at)

    def seen(self, at: dt.datetime) -> None:
        self.last_report = at if self.last_report is None else max(self.last_report, at)


def observe_devices(
    session: Session,
    model: str,
    version: int,
    starts: dict[str, dt.datetime],
    shadow: bool = False,
    known_running_since: dict[str, dt.datetime | None] | None = None,
) -> dict[str, DeviceObservation]:
    """Observations for released devices (device id -> its start-after time); ``known_running_since``
    carries what earlier ticks found, so evidence that has aged out of the queries is not lost."""
    if not starts:
        return {}
    evidence = {d: _Evidence(start=s - dt.timedelta(seconds=CLOCK_SKEW_S)) for d, s in starts.items()}
    for device_id, since_at in (known_running_since or {}).items():
        if since_at is not None and device_id in evidence:
            evidence[device_id].running(since_at)
    since = min(e.start for e in evidence.values())
    ids = list(starts)
    _fold_install_events(session, model, version, ids, since, evidence)
    _fold_heartbeats(session, model, version, ids, since, evidence)
    _fold_windows(session, model, version, ids, since, evidence, shadow)
    polled = dict(session.execute(select(Device.id, Device.last_seen_at).where(Device.id.in_(ids))).tuples().all())
    return {d: _observation(d, starts[d], e, polled.get(d), shadow) for d, e in evidence.items()}


def _events(session: Session, kind: str, model: str, ids: Sequence[str], since: dt.datetime) -> list[DeviceEvent]:
    query = (
        select(DeviceEvent)
        .where(DeviceEvent.type == kind, DeviceEvent.device_id.in_(list(ids)), DeviceEvent.at >= since)
        .order_by(DeviceEvent.at, DeviceEvent.id)
    )
    if kind == "install":
        query = query.where(DeviceEvent.model_name == model)
    return list(session.scalars(query))


def _fold_install_events(
    session: Session, model: str, version: int, ids: Sequence[str], since: dt.datetime, evidence: dict[str, _Evidence]
) -> None:
    for event in _events(session, "install", model, ids, since):
        found = evidence[event.device_id]
        if event.at < found.start or event.bundle_version != version:
            continue
        result = str(event.payload.get("result") or "")
        if result == "installed":
            found.running(event.at)
            found.seen_on_target(event.at)
            found.failure, found.failure_at = None, None
        elif result in FAILED_RESULTS:
            reason = event.payload.get("reason") or "no reason given"
            found.failure, found.failure_at = f"install {result.replace('_', ' ')}: {reason}", event.at


def _fold_heartbeats(
    session: Session, model: str, version: int, ids: Sequence[str], since: dt.datetime, evidence: dict[str, _Evidence]
) -> None:
    """Only each device's latest heartbeat matters (one row per device, however long the soak)."""
    latest = (
        select(func.max(DeviceEvent.id).label("id"))
        .where(DeviceEvent.type == "heartbeat", DeviceEvent.device_id.in_(list(ids)), DeviceEvent.at >= since)
        .group_by(DeviceEvent.device_id)
        .subquery()
    )
    for event in session.scalars(select(DeviceEvent).join(latest, DeviceEvent.id == latest.c.id)):
        found = evidence[event.device_id]
        if event.at < found.start:
            continue
        versions = _running_versions(event.payload, model)
        found.seen(event.at)
        if version in versions:
            found.running(event.at)
            found.seen_on_target(event.at)
        elif versions and found.running_since is not None:
            found.left_target_at = event.at


def _running_versions(payload: dict[str, Any], model: str) -> set[int]:
    """Versions of ``model`` a heartbeat says are running (active, on trial or in shadow)."""
    models = payload.get("models") or []
    entries = [m for m in models if isinstance(m, dict) and m.get("name") == model]
    running = [m for m in entries if m.get("state", "active") in RUNNING_STATES]
    return {m["version"] for m in running if isinstance(m.get("version"), int)}


def _fold_windows(
    session: Session,
    model: str,
    version: int,
    ids: Sequence[str],
    since: dt.datetime,
    evidence: dict[str, _Evidence],
    shadow: bool,
) -> None:
    query = (
        select(MetricWindow.device_id, MetricWindow.bundle_version, func.min(MetricWindow.window_start),
               func.max(MetricWindow.window_end))
        .where(MetricWindow.model_name == model, MetricWindow.device_id.in_(list(ids)), MetricWindow.window_end > since)
        .group_by(MetricWindow.device_id, MetricWindow.bundle_version)
    )  # fmt: skip
    for device_id, window_version, first_start, last_end in session.execute(query).tuples():
        found = evidence[device_id]
        if last_end < found.start:
            continue
        found.windows[int(window_version)] = (first_start, last_end)
        if shadow:
            found.seen(last_end)
        elif window_version == version:
            found.running(max(first_start, found.start))
            found.seen_on_target(last_end)
        else:
            found.seen(last_end)
    if not shadow:
        for found in evidence.values():
            _note_other_version_after_target(found, version)


def _note_other_version_after_target(found: _Evidence, version: int) -> None:
    """A window on another version that ends after the target's last one: the device left the target."""
    if found.running_since is None:
        return
    target_end = found.windows.get(version, (found.running_since, found.running_since))[1]
    later = [end for v, (start, end) in found.windows.items() if v != version and start >= target_end]
    if later:
        found.left_target_at = max(later)


def _observation(
    device_id: str, start: dt.datetime, found: _Evidence, polled_at: dt.datetime | None, shadow: bool
) -> DeviceObservation:
    failure = found.failure
    running_now = found.running_since is not None and found.left_target_at is None
    last_seen = found.last_report if shadow else found.last_on_target
    if last_seen is None:
        last_seen = max([t for t in (found.last_report, polled_at) if t is not None], default=None)
    return DeviceObservation(device_id, start, found.running_since, running_now, failure, last_seen)
