"""The fleet overview: devices counted by state, bundle version, variant, hardware class and last
contact, and the device list filtered with the language of ``edgefleet-server devices list --filter``.

Counts by indexed column are ``GROUP BY`` queries; versions and variants come from what each device
last reported installed (its inventory), read in one streamed pass with the last-seen times. A device
that reports no variant or hardware class is counted as ``not reported``: older agents and simulated
devices do not send everything.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from bundles.errors import ConfigError
from fleet_server.models import Device
from fleet_server.services.fleet import list_devices

NOT_REPORTED = "not reported"
DEVICE_ROWS = 200
LAST_SEEN_BUCKETS_S = ((15 * 60, "in the last 15 min"), (3600, "in the last hour"), (86_400, "in the last day"))
STREAM_CHUNK = 1000


@dataclass
class FleetOverview:
    """What the overview page shows."""

    total: int
    by_status: list[tuple[str, int]]
    by_hw_class: list[tuple[str, int]]
    by_arch: list[tuple[str, int]]
    by_agent: list[tuple[str, int]]
    by_version: list[tuple[str, int]]
    by_variant: list[tuple[str, int]]
    by_last_seen: list[tuple[str, int]]
    expression: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False
    filter_error: str | None = None


def fleet_overview(session: Session, expression: str, now: dt.datetime) -> FleetOverview:
    """Counts over the whole fleet and the first :data:`DEVICE_ROWS` devices matching ``expression``."""
    versions, variants, last_seen = _inventory_counts(session, now)
    overview = FleetOverview(
        total=int(session.scalar(select(func.count()).select_from(Device)) or 0),
        by_status=_count_by(session, Device.status),
        by_hw_class=_count_by(session, Device.hw_class),
        by_arch=_count_by(session, Device.arch),
        by_agent=_count_by(session, Device.agent_version),
        by_version=_sorted(versions),
        by_variant=_sorted(variants),
        by_last_seen=last_seen,
        expression=expression,
    )
    try:
        rows = list_devices(session, expression, limit=DEVICE_ROWS + 1)
    except ConfigError as error:
        overview.filter_error = str(error)
        return overview
    overview.devices = [_row(d) for d in rows[:DEVICE_ROWS]]
    overview.truncated = len(rows) > DEVICE_ROWS
    return overview


def _count_by(session: Session, column: InstrumentedAttribute[Any]) -> list[tuple[str, int]]:
    rows = session.execute(select(column, func.count()).group_by(column))
    return _sorted(Counter({(value if value else NOT_REPORTED): int(count) for value, count in rows}))


def _sorted(counts: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _inventory_counts(session: Session, now: dt.datetime) -> tuple[Counter[str], Counter[str], list[tuple[str, int]]]:
    versions: Counter[str] = Counter()
    variants: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    query = select(Device.installed, Device.last_seen_at).execution_options(yield_per=STREAM_CHUNK)
    for installed, last_seen_at in session.execute(query):
        for entry in active_entries(installed):
            versions[f"{entry['name']}@{entry['version']}"] += 1
            variants[str(entry.get("variant") or NOT_REPORTED)] += 1
        seen[_last_seen_bucket(last_seen_at, now)] += 1
    labels = [label for _, label in LAST_SEEN_BUCKETS_S] + ["earlier", "never"]
    return versions, variants, [(label, seen[label]) for label in labels]


def active_entries(installed: Any) -> Iterable[dict[str, Any]]:
    """The installed entries a device runs (state ``active``, or no state given); junk is skipped."""
    for entry in installed if isinstance(installed, list) else ():
        if isinstance(entry, dict) and entry.get("name") and entry.get("state", "active") == "active":
            yield entry


def _last_seen_bucket(last_seen_at: dt.datetime | None, now: dt.datetime) -> str:
    if last_seen_at is None:
        return "never"
    age_s = (now - last_seen_at).total_seconds()
    return next((label for limit, label in LAST_SEEN_BUCKETS_S if age_s < limit), "earlier")


def _row(device: dict[str, Any]) -> dict[str, Any]:
    running = [f"{e['name']}@{e.get('version')}" + (f" ({e['variant']})" if e.get("variant") else "")
               for e in active_entries(device.get("installed"))]  # fmt: skip
    return {**device, "running": running}
