"""What the server knows about each released device of a wave: its evidence, folded in as telemetry arrives.

Sources (shapes in ``docs/telemetry.md``): ``install`` events (``result`` installed / failed /
rolled_back for ``version``), ``heartbeat`` events (``models``: name, version, state) and metric
windows (one per model version the device served). A device is *running* the target once it reports
an ``installed`` event for it, serves windows on it, or lists it in a heartbeat; it stops running it
when a later window or its latest heartbeat shows another version active (the agent rolled back by
itself). Its *last report* on the target (for the soak) is the end of its latest window or heartbeat
on it. The latest install event wins (a failure after an install, or an install after a failure).

For a shadow wave the device keeps serving its active version and runs the target beside it, so only
install events and heartbeats say it runs the shadow, and any later report counts as a report.
Reports dated before the device was released (minus a clock-skew allowance) are ignored.

:class:`Evidence` holds that per device and is stored with it (``rollout_devices.evidence``): the
fold (:mod:`.fold`) adds each new window and event exactly once, in whatever order they arrive, so a
tick reads one small JSON value per device instead of every report since the release.
:func:`observe_devices` folds a device's stored reports from scratch (the same rules; for tests and
inspection).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.models import Device, DeviceEvent, MetricWindow
from fleet_server.rollouts.decisions import DeviceObservation

CLOCK_SKEW_S = 300.0
FAILED_RESULTS = frozenset({"failed", "rolled_back"})
RUNNING_STATES = frozenset({"active", "trial", "shadow"})


EARLIEST_S, LATEST_S = -62135596800.0, 253402300799.0
"""The epoch seconds of 0001-01-01 and 9999-12-31 23:59:59 UTC: the times a datetime can hold."""


def _epoch(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _datetime(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc) if value is not None else None


def _stamp(value: Any) -> float | None:
    """A stored time (epoch seconds), or None if it is not one a datetime can hold (NaN fails both comparisons)."""
    if type(value) in (int, float) and EARLIEST_S <= value <= LATEST_S:
        return float(value)
    return None


def _later(a: float | None, b: float) -> float:
    return b if a is None or b > a else a


def _earlier(a: float | None, b: float) -> float:
    return b if a is None or b < a else a


@dataclass
class Evidence:
    """What one released device reported on a rollout's target since its start (minus the skew allowance).

    Times are epoch seconds (what is stored, so that reading back thousands of devices a tick converts
    nothing); the methods take and give datetimes.
    """

    start: float
    running_since: float | None = None
    last_on_target: float | None = None
    last_report: float | None = None
    installed_at: float | None = None
    failure: str | None = None
    failure_at: float | None = None
    windows: dict[int, tuple[float, float]] = field(default_factory=dict)  # version -> first start, last end
    heartbeat: tuple[float, int, bool, bool] | None = None  # at, event id, lists target, lists any
    counted: str | None = None  # the rollup this device was last counted in (``fold``)

    @classmethod
    def starting(cls, started_at: dt.datetime) -> Evidence:
        """Empty evidence for a device allowed to start at ``started_at``."""
        return cls(start=started_at.timestamp() - CLOCK_SKEW_S)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None, started_at: dt.datetime | None) -> Evidence:
        """Stored evidence (whatever is unreadable in it is dropped, never raised)."""
        found = cls.starting(started_at) if started_at is not None else cls(start=math.inf)
        data = data if isinstance(data, Mapping) else {}
        found.running_since, found.last_on_target = (
            _stamp(data.get("running_since")),
            _stamp(data.get("last_on_target")),
        )
        found.last_report, found.installed_at = _stamp(data.get("last_report")), _stamp(data.get("installed_at"))
        found.failure_at = _stamp(data.get("failure_at"))
        found.failure = data["failure"] if isinstance(data.get("failure"), str) else None
        found.counted = data["counted"] if isinstance(data.get("counted"), str) else None
        found.windows = _windows_from_json(data.get("windows"))
        found.heartbeat = _heartbeat_from_json(data.get("heartbeat"))
        return found

    def to_json(self) -> dict[str, Any]:
        """The stored form (times as epoch seconds; versions as string keys)."""
        return {
            "running_since": self.running_since, "last_on_target": self.last_on_target,
            "last_report": self.last_report, "installed_at": self.installed_at,
            "failure": self.failure, "failure_at": self.failure_at, "counted": self.counted,
            "windows": {str(v): [s, e] for v, (s, e) in self.windows.items()},
            "heartbeat": list(self.heartbeat) if self.heartbeat is not None else None,
        }  # fmt: skip

    # --- folding reports in -------------------------------------------------------------------------

    def running(self, at: dt.datetime) -> None:
        """Known to run the target since ``at`` (or earlier)."""
        self.running_since = _earlier(self.running_since, at.timestamp())

    def _on_target(self, at: float) -> None:
        self.running_since = _earlier(self.running_since, at)
        self.last_on_target = _later(self.last_on_target, at)
        self.last_report = _later(self.last_report, at)

    def fold_install(self, at: dt.datetime, version: int | None, payload: Mapping[str, Any], target: int) -> None:
        """An ``install`` event of the rollout's model."""
        when = at.timestamp()
        if when < self.start or version != target:
            return
        result = str(payload.get("result") or "")
        if result == "installed":
            self._on_target(when)
            self.installed_at = _later(self.installed_at, when)
            if self.failure_at is None or when >= self.failure_at:
                self.failure, self.failure_at = None, None
        elif result in FAILED_RESULTS and (self.installed_at is None or when >= self.installed_at):
            reason = printable(str(payload.get("reason") or "no reason given")[:300])
            self.failure, self.failure_at = f"install {result.replace('_', ' ')}: {reason}", when

    def fold_heartbeat(
        self, at: dt.datetime, event_id: int, payload: Mapping[str, Any], model: str, target: int
    ) -> None:
        """A heartbeat: a report; running the target if it lists it; the latest one says what runs now."""
        when = at.timestamp()
        if when < self.start:
            return
        versions = running_versions(payload, model)
        self.last_report = _later(self.last_report, when)
        if target in versions:
            self._on_target(when)
        if self.heartbeat is None or (when, event_id) > self.heartbeat[:2]:
            self.heartbeat = (when, event_id, target in versions, bool(versions))

    def fold_window(self, start: dt.datetime, end: dt.datetime, version: int, target: int, shadow: bool) -> None:
        """A metric window of the rollout's model."""
        first, last = start.timestamp(), end.timestamp()
        if last < self.start:
            return
        span = self.windows.get(version)
        self.windows[version] = (first, last) if span is None else (min(span[0], first), max(span[1], last))
        if shadow or version != target:
            self.last_report = _later(self.last_report, last)
        else:
            self.running_since = _earlier(self.running_since, max(first, self.start))
            self.last_on_target = _later(self.last_on_target, last)
            self.last_report = _later(self.last_report, last)

    # --- reading it out -----------------------------------------------------------------------------

    def left_target_at(self, target: int, shadow: bool) -> float | None:
        """When the device was last seen on another version after running the target (None: it still runs it)."""
        if self.running_since is None:
            return None
        left = None
        if self.heartbeat is not None and self.heartbeat[3] and not self.heartbeat[2]:
            left = self.heartbeat[0]
        if not shadow:
            target_end = self.windows.get(target, (self.running_since, self.running_since))[1]
            later = [end for v, (start, end) in self.windows.items() if v != target and start >= target_end]
            if later:
                left = max(later)
        return left

    def stamps(self, target: int, shadow: bool) -> dict[str, Any]:
        """What the tick classifies from, as the ``rollout_devices`` columns that hold it (times as epoch seconds)."""
        return {"running_since": self.running_since, "last_report_at": self.last_report,
                "last_on_target_at": self.last_on_target, "left_target_at": self.left_target_at(target, shadow),
                "failure": self.failure}  # fmt: skip

    def summary(self, target: int, shadow: bool) -> dict[str, Any]:
        """:meth:`stamps` with the times as datetimes."""
        return {k: v if k == "failure" else _datetime(v) for k, v in self.stamps(target, shadow).items()}

    def observation(
        self, device_id: str, started_at: dt.datetime, polled_at: dt.datetime | None, target: int, shadow: bool
    ) -> DeviceObservation:
        """The device's observation for :func:`.decisions.classify_device`."""
        return observation_of(device_id, started_at, polled_at, shadow, **self.summary(target, shadow))


def observation_of(
    device_id: str,
    started_at: dt.datetime,
    polled_at: dt.datetime | None,
    shadow: bool,
    *,
    running_since: dt.datetime | None,
    last_report_at: dt.datetime | None,
    last_on_target_at: dt.datetime | None,
    left_target_at: dt.datetime | None,
    failure: str | None,
) -> DeviceObservation:
    """An observation from a device's evidence summary (see :meth:`Evidence.summary`)."""
    running_now = running_since is not None and left_target_at is None
    last_seen = last_report_at if shadow else last_on_target_at
    if last_seen is None:
        last_seen = max([t for t in (last_report_at, polled_at) if t is not None], default=None)
    return DeviceObservation(device_id, started_at, running_since, running_now, failure, last_seen)


def running_versions(payload: Mapping[str, Any], model: str) -> set[int]:
    """Versions of ``model`` a heartbeat says are running (active, on trial or in shadow)."""
    models = payload.get("models") or []
    if not isinstance(models, list):
        return set()
    entries = [m for m in models if isinstance(m, dict) and m.get("name") == model]
    running = [m for m in entries if isinstance(state := m.get("state", "active"), str) and state in RUNNING_STATES]
    return {m["version"] for m in running if isinstance(m.get("version"), int) and not isinstance(m["version"], bool)}


def printable(text: str) -> str:
    """``text`` with any lone UTF-16 surrogate escaped (``\\ud800``): a reason stored before intake checked
    text, kept in the evidence, which is written as UTF-8 JSON."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _windows_from_json(value: Any) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    if not isinstance(value, Mapping):
        return out
    for version, span in value.items():
        if isinstance(span, list) and len(span) == 2 and str(version).isdigit():
            first, last = _stamp(span[0]), _stamp(span[1])
            if first is not None and last is not None:
                out[int(version)] = (first, last)
    return out


def _heartbeat_from_json(value: Any) -> tuple[float, int, bool, bool] | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    at = _stamp(value[0])
    if at is None or not isinstance(value[1], int):
        return None
    return at, value[1], bool(value[2]), bool(value[3])


# --- from scratch ------------------------------------------------------------------------------------


def observe_devices(
    session: Session,
    model: str,
    version: int,
    starts: dict[str, dt.datetime],
    shadow: bool = False,
    known_running_since: dict[str, dt.datetime | None] | None = None,
) -> dict[str, DeviceObservation]:
    """Observations for released devices (device id -> its start-after time), folding every stored report
    since their start; ``known_running_since`` carries what earlier ticks found."""
    if not starts:
        return {}
    evidence = {d: Evidence.starting(s) for d, s in starts.items()}
    for device_id, since_at in (known_running_since or {}).items():
        if since_at is not None and device_id in evidence:
            evidence[device_id].running(since_at)
    since = dt.datetime.fromtimestamp(min(e.start for e in evidence.values()), dt.timezone.utc)
    ids = list(starts)
    for event in _events(session, ids, since):
        found = evidence[event.device_id]
        if event.type == "install" and event.model_name == model:
            found.fold_install(event.at, event.bundle_version, event.payload or {}, version)
        elif event.type == "heartbeat":
            found.fold_heartbeat(event.at, event.id, event.payload or {}, model, version)
    windows = select(
        MetricWindow.device_id, MetricWindow.bundle_version, MetricWindow.window_start, MetricWindow.window_end
    ).where(MetricWindow.model_name == model, MetricWindow.device_id.in_(ids), MetricWindow.window_end > since)
    for device_id, window_version, start, end in session.execute(windows).tuples():
        evidence[device_id].fold_window(start, end, int(window_version), version, shadow)
    polled = dict(session.execute(select(Device.id, Device.last_seen_at).where(Device.id.in_(ids))).tuples().all())
    return {d: e.observation(d, starts[d], polled.get(d), version, shadow) for d, e in evidence.items()}


def _events(session: Session, ids: Sequence[str], since: dt.datetime) -> list[DeviceEvent]:
    query = (
        select(DeviceEvent)
        .where(DeviceEvent.type.in_(("install", "heartbeat")), DeviceEvent.device_id.in_(list(ids)),
               DeviceEvent.at >= since)
        .order_by(DeviceEvent.at, DeviceEvent.id)
    )  # fmt: skip
    return list(session.scalars(query))
