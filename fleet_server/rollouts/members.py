"""The devices of a wave as the engine reads and writes them on every tick: counts in SQL, a few plain rows.

A tick needs every device of the current wave only as counts (outcomes per variant, how many are
released or downloading, the latest start): :func:`wave_tally` reads them with one ``GROUP BY``.
It loads as rows (:func:`members_to_visit`) only the devices it may change: those not released
yet (to release them), and the released ones whose outcome can have changed since the last
evaluation, which are the devices whose evidence the fold changed since then (stamped with the
rollout's evaluation count, ``evidence_seq``), those past their timeout (``start + soak +
timeout``) and not yet healthy, failed or timed out, and those with no evidence summary but a
running time (rows from before evidence was kept). A device's outcome is a function of those
columns and the clock (:func:`.decisions.classify_device`): healthy, failed and timed out need new
evidence to change (the last two never do) and installing or soaking change without new evidence
only at the timeout, so no other device can change. Changes are written with one executemany per
set of changed columns, at the end of the tick.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from fleet_server.rollouts.decisions import DeviceOutcome
from fleet_server.rollouts.models import RolloutDevice

COLUMNS = ("device_id", "variant", "previous_version", "previous_variant", "released_at", "start_after",
           "running_since", "outcome", "outcome_reason", "outcome_at", "last_report_at", "last_on_target_at",
           "left_target_at", "failure")  # fmt: skip
EVIDENCE_COLUMNS = ("evidence", "running_since", "last_report_at", "last_on_target_at", "left_target_at", "failure")
"""What a device's release (or promotion) clears: its evidence starts again from nothing."""


@dataclass
class Member:
    """One device of a wave; :meth:`set` records what changed for :func:`write_changes`."""

    device_id: str
    variant: str | None
    previous_version: int | None
    previous_variant: str | None
    released_at: dt.datetime | None
    start_after: dt.datetime | None
    running_since: dt.datetime | None
    outcome: str | None
    outcome_reason: str
    outcome_at: dt.datetime | None
    last_report_at: dt.datetime | None
    last_on_target_at: dt.datetime | None
    left_target_at: dt.datetime | None
    failure: str | None
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        """Change columns (recorded only when the value really changes)."""
        for name, value in values.items():
            if getattr(self, name) != value:
                setattr(self, name, value)
                self.changed[name] = value

    def clear_evidence(self) -> None:
        """Forget what the device reported so far (the evidence JSON is not loaded: always written)."""
        self.set(**dict.fromkeys(EVIDENCE_COLUMNS[1:]))
        self.changed["evidence"] = None

    def key(self) -> TallyKey:
        """What :class:`Tally` counts the device by."""
        return self.variant, self.outcome, self.released_at is not None, self.previous_version is not None


TallyKey = tuple[str | None, str | None, bool, bool]
"""variant, outcome (None: waiting), released, has a previous version."""
STICKY = (DeviceOutcome.FAILED.value, DeviceOutcome.TIMED_OUT.value)
"""Outcomes no later report changes."""


@dataclass
class Tally:
    """A wave's devices as counts (:func:`wave_tally`), kept up to date with the changes of the tick (:meth:`moved`)."""

    counts: Counter[TallyKey]
    latest_start: dt.datetime | None = None

    def moved(self, before: Sequence[TallyKey], members: Sequence[Member]) -> None:
        """Count ``members`` (counted as ``before`` until now) as they are now."""
        self.counts.subtract(before)
        self.counts.update(m.key() for m in members)
        starts = [m.start_after for m in members if m.start_after is not None]
        self.latest_start = max([*starts, *([self.latest_start] if self.latest_start else [])], default=None)

    def total(self) -> int:
        """Devices."""
        return sum(self.counts.values())

    def outcomes(self) -> Counter[DeviceOutcome]:
        """Devices by outcome (waiting: those with none)."""
        out: Counter[DeviceOutcome] = Counter()
        for (_, outcome, _, _), n in self.counts.items():
            if n:
                out[DeviceOutcome(outcome or DeviceOutcome.WAITING.value)] += n
        return out

    def released(self, with_previous: bool = False) -> int:
        """Released devices (only those with a previous version if ``with_previous``)."""
        return sum(n for (_, _, released, previous), n in self.counts.items()
                   if released and (previous or not with_previous))  # fmt: skip

    def in_flight(self) -> int:
        """Released devices still installing (told to download, not running the bundle yet)."""
        return sum(n for (_, outcome, released, _), n in self.counts.items()
                   if released and outcome in (None, DeviceOutcome.INSTALLING.value))  # fmt: skip

    def by_variant(self) -> dict[str, Tally]:
        """The devices of each variant they were directed to (``unknown``: none), by variant name."""
        out: dict[str, Tally] = {}
        for key, n in self.counts.items():
            if n:
                out.setdefault(key[0] or "unknown", Tally(Counter())).counts[key] += n
        return dict(sorted(out.items()))


def _of_wave(rollout_id: int, wave_index: int) -> tuple[Any, ...]:
    return (RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave_index == wave_index,
            RolloutDevice.membership == "member")  # fmt: skip


def wave_tally(session: Session, rollout_id: int, wave_index: int) -> Tally:
    """The members of one wave, counted (one ``GROUP BY``)."""
    d = RolloutDevice
    released, previous = d.released_at.is_not(None), d.previous_version.is_not(None)
    query = (
        select(d.variant, d.outcome, released, previous, func.count(), func.max(d.start_after))
        .where(*_of_wave(rollout_id, wave_index)).group_by(d.variant, d.outcome, released, previous)
    )  # fmt: skip
    session.flush()  # ORM changes made earlier in the tick (a promoted shadow wave) are part of what is read
    counts: Counter[TallyKey] = Counter()
    starts = []
    for variant, outcome, is_released, has_previous, n, latest in session.connection().execute(query).all():
        counts[(variant, outcome, bool(is_released), bool(has_previous))] += n
        starts.append(latest)
    return Tally(counts, max((s for s in starts if s is not None), default=None))


def members_to_visit(
    session: Session, rollout_id: int, wave_index: int, evaluation: int, timeout_before: dt.datetime
) -> list[Member]:
    """The members of one wave a tick may change (see the module docstring), ordered by device id: not released, or
    released and not failed or timed out, with evidence changed since evaluation ``evaluation`` started, or
    started before ``timeout_before`` (their timeout has come) and not healthy, or without a report but running."""
    d = RolloutDevice
    open_outcome = or_(d.outcome.is_(None), d.outcome.not_in(STICKY))
    unsettled = or_(d.outcome.is_(None), d.outcome.not_in((*STICKY, DeviceOutcome.HEALTHY.value)))
    may_change = or_(
        d.evidence_seq >= evaluation,
        and_(unsettled, d.start_after <= timeout_before),
        and_(d.last_report_at.is_(None), d.running_since.is_not(None)),
    )
    query = (
        select(*[getattr(d, name) for name in COLUMNS])
        .where(*_of_wave(rollout_id, wave_index),
               or_(d.released_at.is_(None), and_(d.start_after.is_not(None), open_outcome, may_change)))
        .order_by(d.device_id)
    )  # fmt: skip
    session.flush()
    return [Member(*row) for row in session.connection().execute(query).all()]  # Core: no ORM row layer


def shadow_versions(session: Session, rollout_id: int, wave_index: int, released: Iterable[Member]) -> Counter[int]:
    """The previous versions of the wave's released devices that have one, most common first (ties: in device id
    order of their first device); ``released``: devices released by this tick (not written yet)."""
    d = RolloutDevice
    query = (
        select(d.previous_version, func.count(), func.min(d.device_id))
        .where(*_of_wave(rollout_id, wave_index), d.released_at.is_not(None), d.previous_version.is_not(None))
        .group_by(d.previous_version)
    )  # fmt: skip
    counts: Counter[int] = Counter()
    first: dict[int, str] = {}
    for version, n, device_id in session.connection().execute(query).tuples().all():
        counts[int(version or 0)], first[int(version or 0)] = n, device_id  # not NULL: the query's condition
    for member in released:
        if member.previous_version is not None:
            counts[member.previous_version] += 1
            first[member.previous_version] = min(first.get(member.previous_version, member.device_id), member.device_id)
    return Counter(dict(sorted(counts.items(), key=lambda item: (-item[1], first[item[0]]))))


def write_changes(session: Session, rollout_id: int, members: list[Member]) -> int:
    """Write every recorded change (one executemany per set of changed columns); returns the rows changed."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for member in members:
        if member.changed:
            names = tuple(sorted(member.changed))
            groups[names].append({"_device": member.device_id, **{f"_{k}": v for k, v in member.changed.items()}})
            member.changed = {}
    table = cast(Table, RolloutDevice.__table__)
    for names, rows in groups.items():
        statement = (
            update(table)
            .where(table.c.rollout_id == rollout_id, table.c.device_id == bindparam("_device"))
            .values({name: bindparam(f"_{name}") for name in names})
        )
        session.execute(statement, rows)
    return sum(len(rows) for rows in groups.values())


__all__ = ["Member", "Tally", "members_to_visit", "shadow_versions", "wave_tally", "write_changes"]
