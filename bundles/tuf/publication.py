"""Publications: how a release leaves the workstation and enters the fleet server's repository.

The workstation holds the offline targets (release) key. :func:`make_publication` takes the
repository's current signed targets metadata (version N) and the trusted root, adds or replaces
the given files, signs version N+1 with the release key, and packs it into one ``.tar.gz``::

    targets.json                   the new signed targets metadata (version N+1)
    targets/<target path>          each new or changed target file

The server never signs targets: it reads the package with :func:`read_publication` (strict tar
checks: regular files only, no traversal, size caps) and ``TufRepository.accept_publication``
verifies the signature against its trusted root before anything is stored. Each target of a
bundle carries ``custom = {"edgefleet": {"kind", "name", "version", "variant"}}`` derived from its
path (``<name>/<version>/manifest.json`` or ``<name>/<version>/<variant_id>.tar.gz``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from bundles.archive import ArchiveLimits, pack_members, unpack
from bundles.errors import ArchiveError, ConfigError
from bundles.tuf.common import (
    check_signer_role,
    expires_after,
    parse_metadata,
    serialize,
    verify_signatures,
)

TARGETS_MEMBER = "targets.json"
FILES_PREFIX = "targets/"
_BUNDLE_TARGET = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<version>[0-9]+)/(?P<file>[^/]+)$")
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9@+=,_.-]+$")
_COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PublicationLimits:
    """Caps applied while unpacking a publication, so a hostile upload cannot fill the server's disk."""

    max_total_bytes: int = 8 << 30
    max_member_bytes: int = 4 << 30
    max_members: int = 10_000
    max_metadata_bytes: int = 5_000_000


@dataclass
class Publication:
    """An unpacked publication: the new signed targets metadata and the files it brings."""

    targets_bytes: bytes
    files: dict[str, Path] = field(default_factory=dict)


# --- workstation side -----------------------------------------------------------------------------
def make_publication(
    current_targets_bytes: bytes | None,
    root_bytes: bytes,
    files: Mapping[str, str | Path],
    targets_signer: Signer,
    out_path: str | Path,
    expires_days: float = 90,
    *,
    custom: Mapping[str, Mapping[str, Any]] | None = None,
    remove: Iterable[str] = (),
    now: datetime | None = None,
) -> Path:
    """Sign targets version N+1 adding ``files`` (target path -> local file) and pack it at ``out_path``.

    ``custom`` overrides the derived ``custom`` field of a target; ``remove`` drops target paths.
    """
    targets_bytes = build_targets(
        current_targets_bytes, root_bytes, files, targets_signer, expires_days, custom=custom, remove=remove, now=now
    )
    return write_publication(targets_bytes, files, out_path)


def build_targets(
    current_targets_bytes: bytes | None,
    root_bytes: bytes,
    files: Mapping[str, str | Path],
    targets_signer: Signer,
    expires_days: float = 90,
    *,
    custom: Mapping[str, Mapping[str, Any]] | None = None,
    remove: Iterable[str] = (),
    now: datetime | None = None,
) -> bytes:
    """The signed bytes of the next targets version (see :func:`make_publication`)."""
    root = parse_metadata(root_bytes, Root, "root").signed
    current_version, listed = _current_targets(current_targets_bytes, root)
    for path in remove:
        if listed.pop(path, None) is None:
            raise ConfigError(f"cannot remove target {path}: the current targets do not list it")
    for path, local in files.items():
        listed[path] = target_file(path, Path(local), (custom or {}).get(path))
    return sign_targets(root_bytes, current_version + 1, listed, targets_signer, expires_days, now=now)


def sign_targets(
    root_bytes: bytes,
    version: int,
    listed: Mapping[str, TargetFile],
    targets_signer: Signer,
    expires_days: float = 90,
    *,
    now: datetime | None = None,
) -> bytes:
    """Sign targets ``version`` listing exactly ``listed`` (path -> target info) with the release key.

    The release workstation builds ``listed`` from its own ledger (``converter.trust``), never from
    what a server says is current; the signer must be a targets key of ``root_bytes``.
    """
    root = parse_metadata(root_bytes, Root, "root").signed
    check_signer_role(root, "targets", targets_signer)
    targets = Targets(version=version, targets=dict(listed))
    targets.expires = expires_after(timedelta(days=expires_days), now)
    md = Metadata(targets)
    md.sign(targets_signer)
    return serialize(md)


def write_publication(targets_bytes: bytes, files: Mapping[str, str | Path], out_path: str | Path) -> Path:
    """Pack signed targets metadata and the files it adds into a publication ``.tar.gz``."""
    out = Path(out_path)
    _pack(targets_bytes, files, out)
    return out


def edgefleet_custom(target_path: str) -> dict[str, Any] | None:
    """The ``custom`` field of a bundle target, derived from its path; ``None`` for other targets."""
    match = _BUNDLE_TARGET.match(target_path)
    if match is None:
        return None
    name, version, filename = match["name"], int(match["version"]), match["file"]
    if filename == "manifest.json":
        return {"edgefleet": {"kind": "manifest", "name": name, "version": version, "variant": None}}
    if filename.endswith(".tar.gz"):
        variant = filename[: -len(".tar.gz")]
        return {"edgefleet": {"kind": "variant", "name": name, "version": version, "variant": variant}}
    return None


def validate_target_path(path: str) -> str:
    """Return ``path`` if it is a safe relative target path, else raise :class:`ConfigError`.

    Target paths become file paths on the server and URLs on devices: no absolute paths, no ``..``,
    no empty segments, no backslashes or control characters.
    """
    segments = path.split("/")
    if not path or len(path) > 512 or any(not _SAFE_SEGMENT.match(s) or s in (".", "..") for s in segments):
        raise ConfigError(f"unsafe target path {path!r}: use relative a/b/c paths of letters, digits and ._-")
    return path


def _current_targets(current_targets_bytes: bytes | None, root: Root) -> tuple[int, dict[str, TargetFile]]:
    """Version and targets of the verified current metadata; (0, {}) before the first publication."""
    if current_targets_bytes is None:
        return 0, {}
    md = parse_metadata(current_targets_bytes, Targets, "current targets")
    verify_signatures(root, "targets", md, f"current targets v{md.signed.version}")
    return md.signed.version, dict(md.signed.targets)


def target_file(path: str, local: Path, custom: Mapping[str, Any] | None = None) -> TargetFile:
    """The target info (length, sha256, ``custom``) of a local file about to be published at ``path``."""
    validate_target_path(path)
    if not local.is_file():
        raise ConfigError(f"file {local} for target {path} does not exist")
    info = TargetFile.from_file(path, str(local), ["sha256"])
    value = dict(custom) if custom is not None else edgefleet_custom(path)
    if value is not None:
        info.unrecognized_fields["custom"] = value
    return info


def _pack(targets_bytes: bytes, files: Mapping[str, str | Path], out: Path) -> None:
    """Write the publication tar.gz at ``out`` (deterministic, streamed, atomic: :mod:`bundles.archive`)."""
    members: list[tuple[str, bytes | Path]] = [(TARGETS_MEMBER, targets_bytes)]
    members += [(FILES_PREFIX + path, Path(local)) for path, local in files.items()]
    pack_members(members, out)


# --- server side --------------------------------------------------------------------------------
def read_publication(
    publication_path: str | Path, dest_dir: str | Path, limits: PublicationLimits | None = None
) -> Publication:
    """Unpack a publication into ``dest_dir`` with strict checks; the signature is checked by the caller.

    The tar rules (regular files at safe paths only, no links or devices, no duplicates, member,
    total and count caps, nothing after the end) are :func:`bundles.archive.unpack`'s. On top:
    ``targets.json`` must be there and small, every other file must sit under ``targets/`` at a
    valid target path. Raises :class:`ArchiveError`.
    """
    limits = limits or PublicationLimits()
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    unpacked = dest / "publication"
    archive_limits = ArchiveLimits(limits.max_total_bytes, limits.max_member_bytes, limits.max_members)
    names = unpack(publication_path, unpacked, archive_limits)
    if TARGETS_MEMBER not in names:
        raise ArchiveError(f"publication {publication_path} has no {TARGETS_MEMBER}")
    metadata = unpacked / TARGETS_MEMBER
    if metadata.stat().st_size > limits.max_metadata_bytes:
        raise ArchiveError(f"{TARGETS_MEMBER} is larger than {limits.max_metadata_bytes} bytes")
    publication = Publication(targets_bytes=metadata.read_bytes())
    for name in names:
        if name != TARGETS_MEMBER:
            publication.files[_target_of(name)] = unpacked / name
    return publication


def _target_of(member: str) -> str:
    if not member.startswith(FILES_PREFIX):
        raise ArchiveError(f"publication member {member!r} is outside targets/")
    try:
        return validate_target_path(member[len(FILES_PREFIX) :])
    except ConfigError:
        raise ArchiveError(f"publication member {member!r} has an unsafe path") from None


__all__ = [
    "Publication",
    "PublicationLimits",
    "build_targets",
    "edgefleet_custom",
    "make_publication",
    "read_publication",
    "sign_targets",
    "target_file",
    "validate_target_path",
    "write_publication",
]
