"""Writing the ``assignments`` table, the one place the desired-state endpoint reads.

The engine directs a device by upserting its (device, model) row: a live install sets
``bundle_version``; a shadow install keeps the active version and sets ``shadow_version``; a rollback
writes back the tuple the device had before the rollout. ``updated_at`` is always rewritten so the
desired-state ETag changes and polling devices see the new state on their next poll.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db import among
from fleet_server.models import Assignment, Device

ACTIVE_SLOT_STATES = frozenset({"active", "trial", "committed"})


def assignments_for(session: Session, model: str, device_ids: Sequence[str]) -> dict[str, Assignment]:
    """The current assignment rows of ``model`` for these devices."""
    query = select(Assignment).where(Assignment.model_name == model, among(Assignment.device_id, device_ids))
    return {a.device_id: a for a in session.scalars(query)}


def upsert_assignments(
    session: Session, model: str, values_by_device: dict[str, dict[str, Any]], now: dt.datetime
) -> None:
    """Create or update the (device, model) rows with each device's values, reading them in one query
    (a wave of thousands is one SELECT, not thousands)."""
    if not values_by_device:
        return
    existing = assignments_for(session, model, list(values_by_device))
    for device_id, values in values_by_device.items():
        row = existing.get(device_id)
        if row is None:
            row = Assignment(device_id=device_id, model_name=model, **{"pinned": False, **values})
            session.add(row)
        else:
            for key, value in values.items():
                setattr(row, key, value)
        row.updated_at = now


def previous_tuples(
    session: Session, model: str, device_ids: Sequence[str]
) -> dict[str, tuple[int | None, str | None, int | None]]:
    """What each device runs now for ``model``: (version, variant, rollout id) from its assignment,
    else from the active slot of its reported inventory, else nothing."""
    assigned = assignments_for(session, model, device_ids)
    out: dict[str, tuple[int | None, str | None, int | None]] = {}
    missing = [d for d in device_ids if d not in assigned]
    inventory: dict[str, Any] = {}
    if missing:
        for found in session.execute(select(Device.id, Device.installed).where(among(Device.id, missing))):
            inventory[found[0]] = found[1]
    for device_id in device_ids:
        row = assigned.get(device_id)
        if row is not None:
            out[device_id] = (row.bundle_version, row.variant, row.rollout_id)
        else:
            version, variant = active_from_inventory(inventory.get(device_id) or [], model)
            out[device_id] = (version, variant, None)
    return out


def active_from_inventory(installed: list[Any], model: str) -> tuple[int | None, str | None]:
    """The (version, variant) the device reports as active for ``model`` in its inventory."""
    for line in installed:
        if isinstance(line, dict) and line.get("name") == model and line.get("state") == "active":
            version = line.get("version")
            return (version if isinstance(version, int) else None), line.get("variant")
    return None, None
