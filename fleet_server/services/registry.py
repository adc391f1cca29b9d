"""The bundle registry: records derived from the accepted TUF targets, and their lifecycle.

A publication is accepted only by ``TufRepository.accept_publication`` (signature, version and every
hash verified); the registry then reads each new ``<name>/<version>/manifest.json`` target from the
repository and records the bundle (manifest, variants with their target paths and sizes). Nothing
that did not pass TUF verification ever becomes a bundle record.

Delete is refused while an assignment (pinned, rollout or shadow), an unfinished rollout or a
device's reported inventory uses the version. Deleting removes the record, so the version can no
longer be assigned; its files stay in the TUF repository until the release workstation publishes a
targets version without them (the server holds no targets key and cannot sign that change itself).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import inspect, or_, select, text
from sqlalchemy.orm import Session

from bundles.errors import ManifestError
from bundles.manifest import Manifest
from fleet_server.audit import record
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import Assignment, BundleRecord, Device
from fleet_server.services.tuf_host import TufHost

# The rollouts table belongs to fleet_server.rollouts (revision 0003); read by name so that the
# registry does not import that package.
_OPEN_ROLLOUTS_SQL = text(
    "SELECT id, state FROM rollouts WHERE model_name = :name AND bundle_version = :version"
    " AND state NOT IN ('completed', 'aborted', 'rolled_back')"
)


def describe_bundle(bundle: BundleRecord, with_manifest: bool = False) -> dict[str, Any]:
    """The public view of a bundle record."""
    out = {"name": bundle.name, "version": bundle.version, "manifest_target": bundle.manifest_target,
           "variants": bundle.variants, "deprecated": bundle.deprecated, "size_bytes": bundle.size_bytes,
           "created_at": bundle.created_at.isoformat()}  # fmt: skip
    if with_manifest:
        out["manifest"] = bundle.manifest
    return out


def target_file_key(target_path: str, info: dict[str, Any]) -> str:
    """Where a target lives in the repository directory (consistent snapshot: hash-prefixed name)."""
    directory, _, basename = target_path.rpartition("/")
    digest = info["hashes"]["sha256"]
    return f"targets/{directory}/{digest}.{basename}" if directory else f"targets/{digest}.{basename}"


def record_publication(session: Session, host: TufHost, new_targets: list[str], actor: str) -> list[BundleRecord]:
    """Create bundle records for every manifest target the accepted publication added."""
    signed_targets = (host.current_targets() or {}).get("signed", {}).get("targets", {})
    records = []
    for path in sorted(new_targets):
        if path.endswith("/manifest.json") and path in signed_targets:
            records.append(_record_bundle(session, host, path, signed_targets, actor))
    mark_revoked(session, signed_targets, actor)
    return records


def mark_revoked(session: Session, signed_targets: dict[str, Any], actor: str) -> list[BundleRecord]:
    """Deprecate the bundles whose manifest the signed targets no longer list (``edgefleet-convert revoke``).

    Devices can no longer fetch them anyway; deprecating keeps new assignments and rollouts away.
    """
    revoked = []
    for bundle in session.scalars(select(BundleRecord).where(BundleRecord.deprecated.is_(False))):
        if bundle.manifest_target not in signed_targets:
            before, ref = describe_bundle(bundle), f"{bundle.name}@{bundle.version}"
            bundle.deprecated = True
            record(session, actor=actor, action="bundle.revoke", target_type="bundle", target_id=ref,
                   before=before, after=describe_bundle(bundle))  # fmt: skip
            revoked.append(bundle)
    return revoked


def _record_bundle(
    session: Session, host: TufHost, manifest_path: str, signed_targets: dict[str, Any], actor: str
) -> BundleRecord:
    raw = host.storage.read_bytes(target_file_key(manifest_path, signed_targets[manifest_path]))
    manifest = Manifest.from_bytes(raw)
    expected = f"{manifest.name}/{manifest.version}/manifest.json"
    if manifest_path != expected:
        raise ManifestError(f"target {manifest_path} holds the manifest of {manifest.ref} (expected at {expected})")
    variants = [_variant_entry(manifest, v.id, signed_targets) for v in manifest.variants]
    bundle = session.scalar(select(BundleRecord).where(BundleRecord.name == manifest.name,
                                                       BundleRecord.version == manifest.version))  # fmt: skip
    before = describe_bundle(bundle) if bundle else None
    if bundle is None:
        bundle = BundleRecord(name=manifest.name, version=manifest.version)
        session.add(bundle)
    bundle.manifest, bundle.manifest_target, bundle.variants = json.loads(raw), manifest_path, variants
    bundle.size_bytes = sum(int(v.get("size_bytes") or 0) for v in variants)
    session.flush()
    record(session, actor=actor, action="bundle.publish", target_type="bundle", target_id=manifest.ref,
           before=before, after=describe_bundle(bundle))  # fmt: skip
    return bundle


def _variant_entry(manifest: Manifest, variant_id: str, signed_targets: dict[str, Any]) -> dict[str, Any]:
    target = f"{manifest.name}/{manifest.version}/{variant_id}.tar.gz"
    info = signed_targets.get(target)
    variant = manifest.variant(variant_id)
    return {"id": variant_id, "tuf_target": target if info else None, "size_bytes": int(info["length"]) if info else 0,
            "target": variant.target, "precision": variant.precision, "status": variant.status}  # fmt: skip


def list_bundles(session: Session, name: str | None = None, include_deprecated: bool = True) -> list[BundleRecord]:
    """Bundle records by name then newest version first."""
    query = select(BundleRecord).order_by(BundleRecord.name, BundleRecord.version.desc())
    if name:
        query = query.where(BundleRecord.name == name)
    if not include_deprecated:
        query = query.where(BundleRecord.deprecated.is_(False))
    return list(session.scalars(query))


def get_bundle(session: Session, name: str, version: int) -> BundleRecord:
    """One bundle record (404 when unknown)."""
    bundle = session.scalar(select(BundleRecord).where(BundleRecord.name == name, BundleRecord.version == version))
    if bundle is None:
        raise NotFoundError(f"bundle {name}@{version} is not published")
    return bundle


def set_deprecated(session: Session, *, name: str, version: int, deprecated: bool, actor: str) -> BundleRecord:
    """Mark a version deprecated (new assignments, pins and rollouts of it are refused) or undo that.

    Devices already assigned to it keep it, and a rollback may still send devices back to it.
    """
    bundle = get_bundle(session, name, version)
    before = describe_bundle(bundle)
    bundle.deprecated = deprecated
    action = "bundle.deprecate" if deprecated else "bundle.undeprecate"
    record(session, actor=actor, action=action, target_type="bundle", target_id=f"{name}@{version}",
           before=before, after=describe_bundle(bundle))  # fmt: skip
    return bundle


def users_of(session: Session, name: str, version: int) -> list[str]:
    """Who uses a bundle version: assignments (incl. rollouts and shadows) and devices reporting it installed."""
    users = [
        f"assignment {a.device_id}/{a.model_name}" + (f" (rollout {a.rollout_id})" if a.rollout_id else "")
        for a in session.scalars(select(Assignment).where(Assignment.model_name == name, or_(
            Assignment.bundle_version == version, Assignment.shadow_version == version)))
    ]  # fmt: skip
    users += [f"rollout {rollout_id} ({state})" for rollout_id, state in _open_rollouts(session, name, version)]
    for device in session.scalars(select(Device).where(Device.status.in_(("accepted", "pending")))):
        if any(_is_installed(item, name, version) for item in device.installed or ()):
            users.append(f"device {device.id} (installed)")
    return users


def _open_rollouts(session: Session, name: str, version: int) -> list[tuple[int, str]]:
    """Rollouts of this version that have not finished (a draft or paused one holds no assignment yet)."""
    if not inspect(session.connection()).has_table("rollouts"):
        return []
    rows = session.execute(_OPEN_ROLLOUTS_SQL, {"name": name, "version": version})
    return [(int(row[0]), str(row[1])) for row in rows]


def _is_installed(item: Any, name: str, version: int) -> bool:
    return isinstance(item, dict) and item.get("name") == name and item.get("version") == version


def delete_bundle(session: Session, *, name: str, version: int, actor: str) -> None:
    """Delete a bundle record; a :class:`ConflictError` (409) while anything uses it."""
    bundle = get_bundle(session, name, version)
    users = users_of(session, name, version)
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise ConflictError(f"bundle {name}@{version} is in use by {shown}")
    record(session, actor=actor, action="bundle.delete", target_type="bundle", target_id=f"{name}@{version}",
           before=describe_bundle(bundle))  # fmt: skip
    session.delete(bundle)
