"""Which devices a rollout or a pin names, and which of them can take the bundle.

Target tokens: ``all``, ``group:NAME`` (a static group), ``filter:NAME`` (a saved filter),
``where:EXPR`` (an ad-hoc filter expression, same language as saved filters), ``device:ID`` or a bare
device id. Every named device is classified, none is dropped silently:

- ``excluded``: not an accepted device (pending, rejected, decommissioned);
- ``pinned``: an operator pinned its version of this model;
- ``incompatible``: no variant of the bundle can run on its reported capabilities (reasons kept);
- ``member``: it takes part, with the variant ``bundles.selection`` picks for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from bundles.errors import ConfigError, NoCompatibleVariantError
from bundles.manifest import Manifest
from bundles.selection import DeviceCapabilities, select_variant
from fleet_server.db import among
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import Assignment, BundleRecord, Device, DeviceGroup, DeviceGroupMember, SavedFilter
from fleet_server.services import device_filter


@dataclass(frozen=True)
class Placement:
    """One named device and whether (and how) it can take the bundle."""

    device_id: str
    membership: str  # member | incompatible | pinned | excluded
    reason: str = ""
    variant: str | None = None


def load_manifest(session: Session, model: str, version: int, new_assignment: bool = False) -> Manifest:
    """The published manifest of ``model@version``; a 404 naming the bundle if it is not published.

    With ``new_assignment`` (a rollout or a pin) a deprecated or revoked version is a 409; restoring
    devices to what they ran (a rollback) is not a new assignment and is never refused.
    """
    record = session.scalar(select(BundleRecord).where(BundleRecord.name == model, BundleRecord.version == version))
    if record is None:
        raise NotFoundError(f"bundle {model}@{version} is not published on this server")
    if new_assignment and record.deprecated:
        raise ConflictError(f"bundle {model}@{version} is deprecated: new rollouts and pins of it are refused")
    return Manifest.from_dict(record.manifest)


def resolve_targets(session: Session, tokens: Sequence[str]) -> list[str]:
    """Device ids named by the target tokens (deduplicated, sorted)."""
    if not tokens:
        raise ConfigError("give at least one target: all, group:NAME, filter:NAME, where:EXPR or device:ID")
    found: set[str] = set()
    for token in tokens:
        found.update(_resolve_token(session, token.strip()))
    return sorted(found)


def _resolve_token(session: Session, text: str) -> Iterable[str]:
    kind, sep, value = text.partition(":")
    if text == "all":
        return session.scalars(select(Device.id))
    if sep and kind == "group":
        return _group_members(session, value)
    if sep and kind == "filter":
        saved = session.scalar(select(SavedFilter).where(SavedFilter.name == value))
        if saved is None:
            raise NotFoundError(f"saved filter {value!r} does not exist")
        return _filter_matches(session, saved.expression)
    if sep and kind == "where":
        return _filter_matches(session, value)
    device_id = value if sep and kind == "device" else text
    if sep and kind != "device":
        raise ConfigError(f"target {text!r}: use all, group:NAME, filter:NAME, where:EXPR or device:ID")
    if session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id} does not exist")
    return [device_id]


def _group_members(session: Session, name: str) -> list[str]:
    group = session.scalar(select(DeviceGroup).where(DeviceGroup.name == name))
    if group is None:
        raise NotFoundError(f"device group {name!r} does not exist")
    return list(session.scalars(select(DeviceGroupMember.device_id).where(DeviceGroupMember.group_id == group.id)))


def _filter_matches(session: Session, expression: str) -> list[str]:
    """Devices matching a filter expression (the fleet server's filter language)."""
    clauses = device_filter.parse_filter(expression)
    query = select(Device)
    for column, value in device_filter.sql_equalities(clauses).items():
        query = query.where(getattr(Device, column) == value)
    devices = list(session.scalars(query))
    groups = _groups_by_device(session, [d.id for d in devices])
    tags = _tags_by_device(session, [d.id for d in devices])
    return [d.id for d in devices if device_filter.matches(clauses, _filter_view(d, tags, groups))]


def _filter_view(device: Device, tags: dict[str, list[str]], groups: dict[str, list[str]]) -> dict[str, object]:
    return {
        "id": device.id, "fleet": device.fleet, "status": device.status, "hw_class": device.hw_class,
        "arch": device.arch, "os": device.os, "python": device.python, "agent_version": device.agent_version,
        "memory_mb": device.memory_mb, "disk_free_mb": device.disk_free_mb, "capabilities": device.capabilities,
        "tags": tags.get(device.id, []), "groups": groups.get(device.id, []),
    }  # fmt: skip


def _groups_by_device(session: Session, device_ids: list[str]) -> dict[str, list[str]]:
    rows = session.execute(
        select(DeviceGroupMember.device_id, DeviceGroup.name)
        .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
        .where(among(DeviceGroupMember.device_id, device_ids))
    )
    out: dict[str, list[str]] = {}
    for device_id, name in rows:
        out.setdefault(device_id, []).append(name)
    return out


def _tags_by_device(session: Session, device_ids: list[str]) -> dict[str, list[str]]:
    from fleet_server.models import DeviceTag

    out: dict[str, list[str]] = {}
    query = select(DeviceTag.device_id, DeviceTag.tag).where(among(DeviceTag.device_id, device_ids))
    for device_id, tag in session.execute(query):
        out.setdefault(device_id, []).append(tag)
    return out


def place_devices(
    session: Session,
    manifest: Manifest,
    device_ids: Sequence[str],
    honour_pins: bool = True,
    preferences: tuple[str, ...] = (),
) -> list[Placement]:
    """Classify each named device for ``manifest`` (see the module docstring).

    ``preferences`` (a rollout's ``variant_preferences``) rank before each device's own when its variant is
    picked; they never make a variant the device cannot run (or was not validated for) compatible.
    """
    devices = {d.id: d for d in session.scalars(select(Device).where(among(Device.id, device_ids)))}
    pins = select(Assignment.device_id).where(
        Assignment.model_name == manifest.name, Assignment.pinned.is_(True), among(Assignment.device_id, device_ids)
    )
    pinned = set(session.scalars(pins))
    return [_place(devices[d], manifest, honour_pins and d in pinned, preferences) for d in device_ids if d in devices]


def _place(device: Device, manifest: Manifest, is_pinned: bool, preferences: tuple[str, ...]) -> Placement:
    if device.status != "accepted":
        return Placement(device.id, "excluded", f"device is {device.status}, not accepted")
    if is_pinned:
        return Placement(device.id, "pinned", f"{manifest.name} is pinned on this device")
    return place_on_capabilities(device.id, device.capabilities, manifest, preferences)


def place_on_capabilities(device_id: str, capabilities: dict[str, object] | None, manifest: Manifest,
                          preferences: tuple[str, ...] = ()) -> Placement:  # fmt: skip
    """Member with the chosen variant, or incompatible with every variant's reasons."""
    if not capabilities:
        return Placement(device_id, "incompatible", "the device has not reported its capabilities yet")
    try:
        caps = DeviceCapabilities.from_dict(capabilities).with_preferences(preferences)
        variant = select_variant(manifest, caps)
    except NoCompatibleVariantError as error:
        why = "; ".join(f"{vid}: {', '.join(reasons)}" for vid, reasons in error.reasons.items())
        return Placement(device_id, "incompatible", f"no variant of {manifest.ref} can run here ({why})")
    except ConfigError as error:
        return Placement(device_id, "incompatible", f"unreadable capabilities: {error}")
    return Placement(device_id, "member", "", variant.id)
