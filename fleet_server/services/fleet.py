"""Fleet organisation: device listing with filters, static groups, saved filters and assignments."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from bundles.errors import ConfigError
from fleet_server.audit import record
from fleet_server.db import utcnow
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import (
    Assignment,
    BundleRecord,
    Device,
    DeviceGroup,
    DeviceGroupMember,
    DeviceTag,
    SavedFilter,
)
from fleet_server.services.device_filter import matches, parse_filter, sql_equalities
from fleet_server.services.devices import describe_device, get_device

LIST_CHUNK_DEVICES = 1000


def list_devices(session: Session, expression: str = "", limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    """Devices matching a filter expression (see ``device_filter``), as public dicts with tags and groups.

    Reads the fleet in chunks ordered by id (keyset pagination) and stops as soon as ``offset + limit``
    devices matched, so memory stays bounded however large the fleet is.
    """
    clauses = parse_filter(expression)
    base = select(Device).order_by(Device.id).limit(LIST_CHUNK_DEVICES)
    for column, value in sql_equalities(clauses).items():
        base = base.where(func.lower(getattr(Device, column)) == value)
    matched: list[dict[str, Any]] = []
    after: str | None = None
    while len(matched) < offset + limit:
        chunk = list(session.scalars(base if after is None else base.where(Device.id > after)))
        if not chunk:
            break
        matched += [d for d in _described(session, chunk) if matches(clauses, d)]
        after = chunk[-1].id
    return matched[offset : offset + limit]


def _described(session: Session, devices: list[Device]) -> list[dict[str, Any]]:
    ids = [d.id for d in devices]
    tags, groups = _tags_by_device(session, ids), _groups_by_device(session, ids)
    described = [{**describe_device(d), "tags": tags.get(d.id, []), "groups": groups.get(d.id, [])} for d in devices]
    for device in devices:
        session.expunge(device)
    return described


def _tags_by_device(session: Session, device_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    rows = session.execute(
        select(DeviceTag.device_id, DeviceTag.tag).where(DeviceTag.device_id.in_(device_ids)).order_by(DeviceTag.tag)
    )
    for device_id, tag in rows:
        out.setdefault(device_id, []).append(tag)
    return out


def _groups_by_device(session: Session, device_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    rows = session.execute(
        select(DeviceGroupMember.device_id, DeviceGroup.name)
        .join(DeviceGroup)
        .where(DeviceGroupMember.device_id.in_(device_ids))
        .order_by(DeviceGroup.name)
    )
    for device_id, name in rows:
        out.setdefault(device_id, []).append(name)
    return out


def device_detail(session: Session, device_id: str) -> dict[str, Any]:
    """One device with tags and groups."""
    device = get_device(session, device_id)
    groups = _groups_by_device(session, [device_id]).get(device_id, [])
    return {**describe_device(device, session), "groups": groups}


# --- groups ----------------------------------------------------------------------------------------


def describe_group(session: Session, group: DeviceGroup) -> dict[str, Any]:
    """The public view of a group with its member count."""
    members = session.scalar(select(func.count()).where(DeviceGroupMember.group_id == group.id)) or 0
    return {"id": group.id, "name": group.name, "description": group.description,
            "poll_interval_s": group.poll_interval_s, "members": int(members)}  # fmt: skip


def get_group(session: Session, name: str) -> DeviceGroup:
    """The group called ``name`` (404 when there is none)."""
    group = session.scalar(select(DeviceGroup).where(DeviceGroup.name == name))
    if group is None:
        raise NotFoundError(f"group {name!r} does not exist")
    return group


def create_group(
    session: Session, *, name: str, description: str, poll_interval_s: int | None, actor: str
) -> DeviceGroup:
    """A new static group (409 if the name is taken)."""
    if session.scalar(select(DeviceGroup.id).where(DeviceGroup.name == name)) is not None:
        raise ConflictError(f"group {name!r} already exists")
    group = DeviceGroup(name=name, description=description, poll_interval_s=poll_interval_s)
    session.add(group)
    session.flush()
    record(session, actor=actor, action="group.create", target_type="group", target_id=name,
           after=describe_group(session, group))  # fmt: skip
    return group


def update_group(session: Session, *, name: str, changes: dict[str, Any], actor: str) -> DeviceGroup:
    """Change a group's description or poll interval override (``clear_poll_interval`` removes it)."""
    group = get_group(session, name)
    before = describe_group(session, group)
    if changes.get("description") is not None:
        group.description = changes["description"]
    if changes.get("poll_interval_s") is not None:
        group.poll_interval_s = changes["poll_interval_s"]
    if changes.get("clear_poll_interval"):
        group.poll_interval_s = None
    record(session, actor=actor, action="group.update", target_type="group", target_id=name, before=before,
           after=describe_group(session, group))  # fmt: skip
    return group


def delete_group(session: Session, *, name: str, actor: str) -> None:
    """Delete a group (its members stay enrolled)."""
    group = get_group(session, name)
    before = describe_group(session, group)
    session.delete(group)
    record(session, actor=actor, action="group.delete", target_type="group", target_id=name, before=before)


def change_members(session: Session, *, name: str, add: list[str], remove: list[str], actor: str) -> DeviceGroup:
    """Add and remove members (unknown device ids are a 404; adding twice is a no-op)."""
    group = get_group(session, name)
    before = describe_group(session, group)
    current = set(session.scalars(select(DeviceGroupMember.device_id).where(DeviceGroupMember.group_id == group.id)))
    for device_id in sorted(set(add) - current):
        get_device(session, device_id)
        session.add(DeviceGroupMember(group_id=group.id, device_id=device_id))
    if remove:
        session.execute(
            delete(DeviceGroupMember).where(DeviceGroupMember.group_id == group.id,
                                            DeviceGroupMember.device_id.in_(remove))
        )  # fmt: skip
    session.flush()
    record(session, actor=actor, action="group.members", target_type="group", target_id=name, before=before,
           after={**describe_group(session, group), "added": add, "removed": remove})  # fmt: skip
    return group


def list_groups(session: Session) -> list[DeviceGroup]:
    """Every group by name."""
    return list(session.scalars(select(DeviceGroup).order_by(DeviceGroup.name)))


# --- saved filters ---------------------------------------------------------------------------------


def save_filter(session: Session, *, name: str, expression: str, actor: str) -> SavedFilter:
    """Save (or replace) a named filter; the expression is parsed first so a bad one is refused."""
    parse_filter(expression)
    saved = session.scalar(select(SavedFilter).where(SavedFilter.name == name))
    before = {"name": name, "expression": saved.expression} if saved else None
    if saved is None:
        saved = SavedFilter(name=name, expression=expression)
        session.add(saved)
    saved.expression = expression
    session.flush()
    record(session, actor=actor, action="filter.save", target_type="filter", target_id=name, before=before,
           after={"name": name, "expression": expression})  # fmt: skip
    return saved


def get_filter(session: Session, name: str) -> SavedFilter:
    """The saved filter called ``name`` (404 when there is none)."""
    saved = session.scalar(select(SavedFilter).where(SavedFilter.name == name))
    if saved is None:
        raise NotFoundError(f"saved filter {name!r} does not exist")
    return saved


def delete_filter(session: Session, *, name: str, actor: str) -> None:
    """Delete a saved filter."""
    saved = get_filter(session, name)
    record(session, actor=actor, action="filter.delete", target_type="filter", target_id=name,
           before={"name": name, "expression": saved.expression})  # fmt: skip
    session.delete(saved)


# --- assignments -----------------------------------------------------------------------------------


def describe_assignment(a: Assignment) -> dict[str, Any]:
    """The public view of an assignment row."""
    return {
        "device_id": a.device_id, "model_name": a.model_name, "bundle_version": a.bundle_version,
        "variant": a.variant, "rollout_id": a.rollout_id, "shadow_version": a.shadow_version, "pinned": a.pinned,
        "start_after": a.start_after.isoformat() if a.start_after else None,
        "updated_at": a.updated_at.isoformat() if a.updated_at else None,
    }  # fmt: skip


def assign(session: Session, *, request: dict[str, Any], actor: str) -> Assignment:
    """Point one device at a published bundle version (an admin pin; the rollout engine writes its own)."""
    get_device(session, request["device_id"])
    bundle = session.scalar(select(BundleRecord).where(BundleRecord.name == request["model_name"],
                                                       BundleRecord.version == request["bundle_version"]))  # fmt: skip
    if bundle is None:
        raise NotFoundError(f"bundle {request['model_name']}@{request['bundle_version']} is not published")
    if bundle.deprecated:
        raise ConflictError(f"bundle {bundle.name}@{bundle.version} is deprecated: new assignments of it are refused")
    if request.get("variant") and request["variant"] not in {v.get("id") for v in bundle.variants}:
        raise ConfigError(f"bundle {bundle.name}@{bundle.version} has no variant {request['variant']!r}")
    row = session.scalar(select(Assignment).where(Assignment.device_id == request["device_id"],
                                                  Assignment.model_name == request["model_name"]))  # fmt: skip
    before = describe_assignment(row) if row else None
    if row is None:
        row = Assignment(device_id=request["device_id"], model_name=request["model_name"], bundle_version=0)
        session.add(row)
    row.bundle_version, row.variant, row.pinned = request["bundle_version"], request.get("variant"), request["pinned"]
    row.rollout_id, row.updated_at = None, utcnow()
    session.flush()
    record(session, actor=actor, action="assignment.set", target_type="assignment",
           target_id=f"{row.device_id}/{row.model_name}", before=before, after=describe_assignment(row))  # fmt: skip
    return row


def unassign(session: Session, *, device_id: str, model_name: str, actor: str) -> None:
    """Remove a device's assignment for a model (the device keeps what it runs, nothing new is pushed)."""
    row = session.scalar(select(Assignment).where(Assignment.device_id == device_id,
                                                  Assignment.model_name == model_name))  # fmt: skip
    if row is None:
        raise NotFoundError(f"device {device_id} has no assignment for {model_name!r}")
    record(session, actor=actor, action="assignment.delete", target_type="assignment",
           target_id=f"{device_id}/{model_name}", before=describe_assignment(row))  # fmt: skip
    session.delete(row)


def list_assignments(session: Session, device_id: str | None = None, model_name: str | None = None) -> list[Assignment]:
    """Assignments, optionally for one device or one model."""
    query = select(Assignment).order_by(Assignment.device_id, Assignment.model_name)
    if device_id:
        query = query.where(Assignment.device_id == device_id)
    if model_name:
        query = query.where(Assignment.model_name == model_name)
    return list(session.scalars(query))
