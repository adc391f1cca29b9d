"""The TUF repository on disk: what the fleet server (or a local directory) serves to devices.

Layout (consistent snapshots, so devices can read while the repository changes)::

    metadata/1.root.json, 2.root.json, ..., root.json (a copy of the newest root)
    metadata/N.targets.json     signed offline by the release key (never by this code)
    metadata/N.snapshot.json    signed here with the online snapshot key
    metadata/timestamp.json     signed here with the online timestamp key
    targets/<dir>/<sha256>.<basename>

State is read from the chain ``timestamp.json -> N.snapshot.json -> N.targets.json``, never from a
directory listing, and ``timestamp.json`` is replaced last: it is the commit point. A crash half
way through leaves only unreferenced files, which the next write overwrites. Writers take an
exclusive lock on ``<repo>/.lock`` so two uploads cannot both become version N+1.

What the online keys can do is limited on purpose: this code only ever signs snapshot and
timestamp. New targets arrive as a publication signed offline (:mod:`bundles.tuf.publication`)
and are accepted only if a threshold of the root's targets keys signed them.

:class:`LocalRepository` is the single-machine case (development, the demo, ``publish --repo``):
all four role keys live in one key directory and a release is signed and accepted in one call.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from bundles.canonical import sha256_bytes
from bundles.errors import (
    ArchiveError,
    ConfigError,
    TargetMismatchError,
    TargetRewriteError,
    TrustError,
    UnknownTargetError,
    VersionConflictError,
)
from bundles.tuf import keys as keyfiles
from bundles.tuf.common import (
    TOP_LEVEL_ROLES,
    Expiry,
    atomic_write_bytes,
    check_not_expired,
    check_signer_role,
    parse_metadata,
    serialize,
    utc_now,
    verify_root_chain,
    verify_signatures,
)
from bundles.tuf.publication import (
    PublicationLimits,
    build_targets,
    read_publication,
    validate_target_path,
)
from bundles.tuf.root import make_root

try:  # POSIX; elsewhere a single writer process is assumed
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?(?:root|targets|snapshot|timestamp)\.json$")
DEFAULT_TIMESTAMP_MARGIN_S = 6 * 3600
DEFAULT_SNAPSHOT_MARGIN_S = 2 * 86400


class TufRepository:
    """A TUF repository directory with online snapshot/timestamp signing and verified publications."""

    def __init__(
        self, repo_dir: str | Path, *, expiry: Expiry | None = None, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.root_dir = Path(repo_dir)
        self.metadata_dir = self.root_dir / "metadata"
        self.targets_dir = self.root_dir / "targets"
        self.expiry = expiry or Expiry()
        self._clock = clock

    # --- reading state ------------------------------------------------------------------------
    def trusted_root(self) -> bytes | None:
        """The newest root's bytes, or ``None`` before a root was installed."""
        return self._read_metadata("root.json")

    def current_targets(self) -> bytes | None:
        """The current signed targets metadata (the one the snapshot lists), or ``None`` before any publication."""
        snapshot = self._snapshot()
        if snapshot is None:
            return None
        version = snapshot.signed.meta["targets.json"].version
        return self._require_metadata(f"{version}.targets.json")

    def current_targets_version(self) -> int:
        """The version of the current targets metadata, 0 before any publication."""
        data = self.current_targets()
        return 0 if data is None else parse_metadata(data, Targets, "current targets").signed.version

    def target_paths(self) -> list[str]:
        """The target paths the current targets metadata lists, sorted."""
        return sorted(self._targets())

    def target_info(self, path: str) -> TargetFile:
        """The signed length, hashes and custom field of one target."""
        info = self._targets().get(path)
        if info is None:
            raise UnknownTargetError(f"target {path} is not in the current targets metadata")
        return info

    def target_custom(self, path: str) -> dict[str, Any]:
        """The ``edgefleet`` part of a target's ``custom`` field ({} when absent)."""
        custom = self.target_info(path).custom
        value = custom.get("edgefleet") if isinstance(custom, dict) else None
        return dict(value) if isinstance(value, dict) else {}

    def expiries(self) -> dict[str, datetime]:
        """When each role's current metadata expires (roles without metadata are left out)."""
        found: dict[str, datetime] = {}
        for role, data in self._current_role_bytes().items():
            found[role] = parse_metadata(data, _ROLE_TYPES[role], role).signed.expires
        return found

    # --- serving ------------------------------------------------------------------------------
    def metadata_file(self, filename: str) -> Path:
        """The file to serve for ``GET .../metadata/<filename>``; :class:`UnknownTargetError` if none."""
        if not _METADATA_NAME.match(filename):
            raise UnknownTargetError(f"{filename!r} is not a TUF metadata file name")
        path = self.metadata_dir / filename
        if not path.is_file():
            raise UnknownTargetError(f"metadata file {filename} does not exist")
        return path

    def target_file(self, url_path: str) -> Path:
        """The file to serve for ``GET .../targets/<url_path>`` (a hash-prefixed name); rejects traversal."""
        try:
            validate_target_path(url_path)
        except ConfigError:
            raise UnknownTargetError(f"{url_path!r} is not a valid target path") from None
        path = self.targets_dir.joinpath(*PurePosixPath(url_path).parts)
        if path.is_symlink() or not path.is_file():
            raise UnknownTargetError(f"target file {url_path} does not exist")
        if not path.resolve().is_relative_to(self.targets_dir.resolve()):
            raise UnknownTargetError(f"target file {url_path} resolves outside the repository")
        return path

    # --- writing ------------------------------------------------------------------------------
    def initialize(
        self,
        root_signers: Sequence[Signer],
        targets_keys: Sequence[Key | Signer],
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        expiry: Expiry | None = None,
    ) -> bytes:
        """Create root version 1 for the given keys and install it; returns the root bytes.

        Snapshot and timestamp appear with the first publication (there is nothing to list before).
        """
        if expiry is not None:
            self.expiry = expiry
        days = self.expiry.root / timedelta(days=1)
        root_bytes = make_root(root_signers, targets_keys, snapshot_signer, timestamp_signer, 1, days, now=self._now())
        self.rotate_root(root_bytes)
        return root_bytes

    def rotate_root(
        self, new_root_bytes: bytes, snapshot_signer: Signer | None = None, timestamp_signer: Signer | None = None
    ) -> int:
        """Install root version 1, or version N+1 signed by a threshold of the old AND the new root keys.

        If the rotation changes the snapshot or timestamp keys, pass the new online signers: the
        current snapshot and timestamp are re-signed with them so devices keep updating. Returns
        the installed version.
        """
        with self._locked():
            previous_bytes = self.trusted_root()
            previous = None if previous_bytes is None else self._parse_root(previous_bytes)
            md = parse_metadata(new_root_bytes, Root, "new root")
            verify_root_chain(previous, md, f"root v{md.signed.version}")
            check_not_expired(md.signed, self._now(), f"root v{md.signed.version}")
            resign = self._online_roles_to_resign(previous, md.signed)
            self._check_online_signers(md.signed, resign, snapshot_signer, timestamp_signer)
            self._write_metadata(f"{md.signed.version}.root.json", new_root_bytes)
            self._write_metadata("root.json", new_root_bytes)
            if resign:
                assert snapshot_signer is not None and timestamp_signer is not None
                self._resign_online(md.signed, snapshot_signer, timestamp_signer)
            logger.info("installed root v%d (re-signed: %s)", md.signed.version, ", ".join(resign) or "nothing")
            return md.signed.version

    def accept_publication(
        self,
        publication_path: str | Path,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        limits: PublicationLimits | None = None,
    ) -> list[str]:
        """Verify a publication and make it current; returns the new or changed target paths.

        Checks, in order: safe archive; targets signed by a threshold of the trusted root's
        targets keys; version = current + 1; not expired; each new or changed target file's length
        and sha256; no file that the signed targets do not list. Only then are files and metadata
        written, ``timestamp.json`` last.
        """
        with tempfile.TemporaryDirectory(prefix=".incoming-", dir=self._incoming_parent()) as tmp:
            publication = read_publication(publication_path, tmp, limits)
            return self.accept_targets(publication.targets_bytes, publication.files, snapshot_signer, timestamp_signer)

    def accept_targets(
        self,
        targets_bytes: bytes,
        files: Mapping[str, Path],
        snapshot_signer: Signer,
        timestamp_signer: Signer,
    ) -> list[str]:
        """The checks and writes of :meth:`accept_publication`, for targets metadata and files already on disk."""
        with self._locked():
            root = self._root()
            md = self._verify_new_targets(root, targets_bytes)
            changed = self._changed_targets(md.signed)
            self._refuse_rewrites(changed)
            self._check_files(md.signed, changed, files)
            check_signer_role(root, "snapshot", snapshot_signer)
            check_signer_role(root, "timestamp", timestamp_signer)
            for path in changed:
                _verify_target_file(md.signed.targets[path], files[path])
            for path in changed:
                self._store_target(md.signed.targets[path], files[path])
            version = md.signed.version
            self._write_metadata(f"{version}.targets.json", targets_bytes)
            self._write_snapshot_and_timestamp(_meta_file(version, targets_bytes), snapshot_signer, timestamp_signer)
            logger.info("accepted targets v%d with %d new or changed targets", version, len(changed))
            return changed

    def refresh_timestamp(
        self,
        timestamp_signer: Signer,
        if_expires_within_s: float = DEFAULT_TIMESTAMP_MARGIN_S,
        *,
        snapshot_signer: Signer | None = None,
        snapshot_if_expires_within_s: float = DEFAULT_SNAPSHOT_MARGIN_S,
    ) -> list[str]:
        """Re-sign the timestamp (and the snapshot, given its signer) when it expires within the margin.

        Call it periodically on the server; returns the roles that were re-signed. Without this a
        device refuses a quiet repository after a day, which is the point: it detects a freeze.
        """
        with self._locked():
            timestamp, snapshot = self._timestamp(), self._snapshot()
            if timestamp is None or snapshot is None:
                return []
            root = self._root()
            check_signer_role(root, "timestamp", timestamp_signer)
            snapshot_due = snapshot_signer is not None and self._expires_within(
                snapshot.signed, snapshot_if_expires_within_s
            )
            if snapshot_due:
                assert snapshot_signer is not None
                check_signer_role(root, "snapshot", snapshot_signer)
                self._write_snapshot_and_timestamp(
                    snapshot.signed.meta["targets.json"], snapshot_signer, timestamp_signer
                )
                return ["snapshot", "timestamp"]
            if self._expires_within(timestamp.signed, if_expires_within_s):
                self._write_timestamp(timestamp.signed.snapshot_meta, timestamp_signer)
                return ["timestamp"]
            return []

    def prune(self, keep_versions: int = 2) -> list[str]:
        """Delete target files that none of the last ``keep_versions`` targets versions lists.

        Keeping the previous version's files lets a device that refreshed just before a publication
        finish its download. Returns the served paths removed.
        """
        with self._locked():
            current = self.current_targets_version()
            keep: set[str] = set()
            for version in range(max(1, current - keep_versions + 1), current + 1):
                data = self._require_metadata(f"{version}.targets.json")
                listed = parse_metadata(data, Targets, f"targets v{version}").signed.targets.values()
                keep.update(served_path(info) for info in listed)
            removed = []
            for path in sorted(self.targets_dir.rglob("*")) if self.targets_dir.exists() else []:
                relative = path.relative_to(self.targets_dir).as_posix()
                if path.is_file() and relative not in keep:
                    path.unlink()
                    removed.append(relative)
            return removed

    def remove_targets(self, targets_bytes: bytes, snapshot_signer: Signer, timestamp_signer: Signer) -> list[str]:
        """Accept a new signed targets version that drops targets; returns the removed paths.

        Removal needs the release key like any other change: the server cannot un-list a target itself.
        """
        before = set(self.target_paths())
        self.accept_targets(targets_bytes, {}, snapshot_signer, timestamp_signer)
        return sorted(before - set(self.target_paths()))

    # --- checks ------------------------------------------------------------------------------
    def _verify_new_targets(self, root: Root, targets_bytes: bytes) -> Metadata[Targets]:
        md = parse_metadata(targets_bytes, Targets, "published targets")
        version = md.signed.version
        verify_signatures(root, "targets", md, f"published targets v{version}")
        expected = self.current_targets_version() + 1
        if version != expected:
            raise VersionConflictError(f"published targets have version {version}, expected {expected}")
        check_not_expired(md.signed, self._now(), f"published targets v{version}")
        if md.signed.delegations is not None:
            raise TrustError(
                f"published targets v{version} delegate to other roles, which this repository does not serve"
            )
        for path in md.signed.targets:
            try:
                validate_target_path(path)
            except ConfigError:
                raise TrustError(f"published targets v{version} list an unsafe target path {path!r}") from None
        return md

    def _refuse_rewrites(self, changed: Sequence[str]) -> None:
        """Published targets are immutable: a new version may add or drop paths, never change their bytes."""
        current = self._targets()
        rewritten = [path for path in changed if path in current]
        if rewritten:
            raise TargetRewriteError(
                f"target {rewritten[0]} is already published with other content"
                f"{f' (and {len(rewritten) - 1} more)' if len(rewritten) > 1 else ''}: publish a new version instead"
            )

    def _changed_targets(self, new: Targets) -> list[str]:
        """Paths whose file is new: unlisted before, or listed with another length or hash."""
        current = self._targets()
        return sorted(path for path, info in new.targets.items() if not _same_file(current.get(path), info))

    def _check_files(self, new: Targets, changed: Sequence[str], files: Mapping[str, Path]) -> None:
        missing = [p for p in changed if p not in files]
        if missing:
            raise ArchiveError(f"publication lacks the file of new target {missing[0]}")
        extra = sorted(set(files) - set(new.targets))
        if extra:
            raise ArchiveError(f"publication carries {extra[0]}, which the signed targets do not list")

    def _online_roles_to_resign(self, previous: Root | None, new: Root) -> list[str]:
        if previous is None or self._timestamp() is None:
            return []
        changed = [r for r in ("snapshot", "timestamp") if previous.roles[r] != new.roles[r]]
        return ["snapshot", "timestamp"] if changed else []

    def _check_online_signers(
        self, root: Root, resign: Sequence[str], snapshot_signer: Signer | None, timestamp_signer: Signer | None
    ) -> None:
        """Refuse a root this server could not serve: given online signers must be the root's online keys."""
        if resign and (snapshot_signer is None or timestamp_signer is None):
            raise ConfigError(
                f"root v{root.version} changes the online keys: pass the new snapshot and timestamp signers"
            )
        for role, signer in (("snapshot", snapshot_signer), ("timestamp", timestamp_signer)):
            if signer is not None:
                check_signer_role(root, role, signer)

    # --- writes ------------------------------------------------------------------------------
    def _store_target(self, info: TargetFile, local: Path) -> None:
        """Copy a verified file to its hash-prefixed name (content-addressed, so never overwritten wrongly).

        The prefix is the first listed hash, the one ngclient puts in the URL.
        """
        dest = self.targets_dir.joinpath(*PurePosixPath(served_path(info)).parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(local, tmp)
        tmp.replace(dest)

    def _resign_online(self, root: Root, snapshot_signer: Signer, timestamp_signer: Signer) -> None:
        snapshot = self._snapshot()
        if snapshot is not None:
            self._write_snapshot_and_timestamp(snapshot.signed.meta["targets.json"], snapshot_signer, timestamp_signer)
            logger.info("re-signed snapshot and timestamp for root v%d", root.version)

    def _write_snapshot_and_timestamp(self, targets_meta: MetaFile, snapshot_signer: Signer, ts_signer: Signer) -> None:
        previous = self._snapshot()
        snapshot = Snapshot(
            version=(previous.signed.version if previous else 0) + 1,
            expires=self._now() + self.expiry.snapshot,
            meta={"targets.json": targets_meta},
        )
        md = Metadata(snapshot)
        md.sign(snapshot_signer)
        data = serialize(md)
        self._write_metadata(f"{snapshot.version}.snapshot.json", data)
        self._write_timestamp(_meta_file(snapshot.version, data), ts_signer)

    def _write_timestamp(self, snapshot_meta: MetaFile, timestamp_signer: Signer) -> None:
        previous = self._timestamp()
        timestamp = Timestamp(
            version=(previous.signed.version if previous else 0) + 1,
            expires=self._now() + self.expiry.timestamp,
            snapshot_meta=snapshot_meta,
        )
        md = Metadata(timestamp)
        md.sign(timestamp_signer)
        self._write_metadata("timestamp.json", serialize(md))

    def _write_metadata(self, filename: str, data: bytes) -> None:
        atomic_write_bytes(self.metadata_dir / filename, data)

    # --- reading helpers -----------------------------------------------------------------------
    def _now(self) -> datetime:
        return self._clock()

    def _expires_within(self, signed: Timestamp | Snapshot, margin_s: float) -> bool:
        return signed.expires <= self._now() + timedelta(seconds=margin_s)

    def _read_metadata(self, filename: str) -> bytes | None:
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError:
            return None

    def _require_metadata(self, filename: str) -> bytes:
        data = self._read_metadata(filename)
        if data is None:
            raise TrustError(f"repository {self.root_dir} is inconsistent: metadata/{filename} is missing")
        return data

    def _root(self) -> Root:
        data = self.trusted_root()
        if data is None:
            raise ConfigError(f"repository {self.root_dir} has no root yet: install a signed root first")
        return self._parse_root(data)

    @staticmethod
    def _parse_root(data: bytes) -> Root:
        return parse_metadata(data, Root, "trusted root").signed

    def _timestamp(self) -> Metadata[Timestamp] | None:
        data = self._read_metadata("timestamp.json")
        return None if data is None else parse_metadata(data, Timestamp, "timestamp")

    def _snapshot(self) -> Metadata[Snapshot] | None:
        timestamp = self._timestamp()
        if timestamp is None:
            return None
        data = self._require_metadata(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        return parse_metadata(data, Snapshot, "snapshot")

    def _targets(self) -> dict[str, TargetFile]:
        data = self.current_targets()
        if data is None:
            return {}
        return parse_metadata(data, Targets, "current targets").signed.targets

    def _current_role_bytes(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for role, data in (("root", self.trusted_root()), ("targets", self.current_targets())):
            if data is not None:
                found[role] = data
        timestamp = self._read_metadata("timestamp.json")
        if timestamp is not None:
            found["timestamp"] = timestamp
            snapshot = self._snapshot()
            if snapshot is not None:
                found["snapshot"] = serialize(snapshot)
        return found

    def _incoming_parent(self) -> Path:
        """Unpack uploads next to the repository, so storing a target is a rename on the same disk."""
        self.root_dir.mkdir(parents=True, exist_ok=True)
        return self.root_dir

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root_dir / ".lock", "a+b") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


_ROLE_TYPES: dict[str, Any] = {"root": Root, "targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}


def served_path(info: TargetFile) -> str:
    """The URL path (under ``targets/``) a target is served at: ``<dir>/<first hash>.<basename>``, as ngclient asks."""
    directory, sep, basename = info.path.rpartition("/")
    return f"{directory}{sep}{next(iter(info.hashes.values()))}.{basename}"


def _same_file(old: TargetFile | None, new: TargetFile) -> bool:
    return old is not None and old.length == new.length and old.hashes == new.hashes


def _verify_target_file(info: TargetFile, local: Path) -> None:
    """Raise :class:`TargetMismatchError` unless ``local`` has the signed length and sha256 of ``info``."""
    if "sha256" not in info.hashes:
        raise TargetMismatchError(f"target {info.path} has no sha256 in its signed metadata")
    try:
        with open(local, "rb") as f:
            info.verify_length_and_hashes(f)
    except LengthOrHashMismatchError as e:
        raise TargetMismatchError(f"file of target {info.path} does not match its signed length and sha256") from e


def _meta_file(version: int, data: bytes) -> MetaFile:
    """Version, length and sha256 of a metadata file: pinning the hash is what detects mix-and-match."""
    return MetaFile(version=version, length=len(data), hashes={"sha256": sha256_bytes(data)})


# --- the single-machine case ------------------------------------------------------------------------
KEY_FILES = {role: f"{role}.key" for role in TOP_LEVEL_ROLES}


def default_keys_dir(repo_dir: Path) -> Path:
    """``<repo>-keys`` next to the repository: never inside a directory that may be served as a whole."""
    return repo_dir.with_name(repo_dir.name + "-keys")


@dataclass
class LocalRepository:
    """A repository whose four role keys sit in one directory: development, the demo, ``publish --repo``.

    In production the root and targets keys stay on the workstation and snapshot/timestamp on the
    server (see docs/security.md); this class is the same code path with all keys at hand.
    """

    repository: TufRepository
    keys_dir: Path

    @classmethod
    def create(
        cls, repo_dir: str | Path, keys_dir: str | Path | None = None, *, expiry: Expiry | None = None
    ) -> LocalRepository:
        """Generate the four role keys (mode 0600) in ``keys_dir`` (default ``<repo>-keys``) and root v1."""
        repo_path = Path(repo_dir)
        keys_path = Path(keys_dir) if keys_dir is not None else default_keys_dir(repo_path)
        signers = {role: keyfiles.generate_key(keys_path / name) for role, name in KEY_FILES.items()}
        repository = TufRepository(repo_path, expiry=expiry)
        repository.initialize([signers["root"]], [signers["targets"]], signers["snapshot"], signers["timestamp"])
        return cls(repository, keys_path)

    @classmethod
    def open(
        cls, repo_dir: str | Path, keys_dir: str | Path | None = None, *, expiry: Expiry | None = None
    ) -> LocalRepository:
        """Open a repository made by :meth:`create`."""
        repo_path = Path(repo_dir)
        keys_path = Path(keys_dir) if keys_dir is not None else default_keys_dir(repo_path)
        local = cls(TufRepository(repo_path, expiry=expiry), keys_path)
        if local.repository.trusted_root() is None:
            raise ConfigError(f"{repo_path} is not a TUF repository (no metadata/root.json)")
        return local

    @classmethod
    def open_or_create(cls, repo_dir: str | Path, keys_dir: str | Path | None = None) -> LocalRepository:
        """Open the repository at ``repo_dir``, creating it (and its keys) on first use."""
        if (Path(repo_dir) / "metadata" / "root.json").exists():
            return cls.open(repo_dir, keys_dir)
        return cls.create(repo_dir, keys_dir)

    def signer(self, role: str) -> Signer:
        """The signer of ``role`` loaded from the key directory (mode-checked)."""
        return keyfiles.load_signer(self.keys_dir / KEY_FILES[role])

    def publish(
        self,
        files: Mapping[str, str | Path],
        *,
        custom: Mapping[str, Mapping[str, Any]] | None = None,
        remove: Sequence[str] = (),
    ) -> list[str]:
        """Sign a new targets version with ``files`` and make it current; returns the new or changed paths."""
        repo = self.repository
        root = repo.trusted_root()
        assert root is not None
        days = repo.expiry.targets / timedelta(days=1)
        targets_bytes = build_targets(
            repo.current_targets(), root, files, self.signer("targets"), days, custom=custom, remove=remove
        )
        local_files = {path: Path(local) for path, local in files.items()}
        return repo.accept_targets(targets_bytes, local_files, self.signer("snapshot"), self.signer("timestamp"))

    def refresh(self) -> list[str]:
        """Re-sign timestamp and snapshot if they are close to expiry."""
        return self.repository.refresh_timestamp(self.signer("timestamp"), snapshot_signer=self.signer("snapshot"))


__all__ = ["KEY_FILES", "LocalRepository", "TufRepository", "default_keys_dir", "served_path"]
