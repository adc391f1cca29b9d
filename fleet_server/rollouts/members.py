"""The devices of a wave as the engine reads and writes them on every tick: plain rows, bulk writes.

A tick looks at every device of the current wave (thousands in a large fleet's late waves). Loading
them as ORM objects, and flushing each change as its own statement, cost more than everything else
in a tick; here they are read with one Core query and their changes written with one executemany
per set of changed columns, at the end of the tick.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

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


def wave_members(session: Session, rollout_id: int, wave_index: int) -> list[Member]:
    """The members of one wave, ordered by device id."""
    columns = [getattr(RolloutDevice, name) for name in COLUMNS]
    query = (
        select(*columns)
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave_index == wave_index,
               RolloutDevice.membership == "member")
        .order_by(RolloutDevice.device_id)
    )  # fmt: skip
    session.flush()  # ORM changes made earlier in the tick (a promoted shadow wave) are part of what is read
    return [Member(*row) for row in session.connection().execute(query)]  # Core: no ORM row layer for plain columns


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


__all__ = ["Member", "wave_members", "write_changes"]
