"""Archives: deterministic packing and defensive unpacking of tar.gz files (the one tar module of edgefleet).

Bundles, single variants and TUF publications (``bundles.tuf.publication``) are all written by
:func:`pack_members` and read by :func:`unpack` (or the bundle-aware wrappers below), so the safety
rules are in one place.

A bundle travels as a ``.efb`` (a tar.gz with ``manifest.json`` at the root and every variant file
at its manifest path); a single variant travels as a tar.gz of just that variant's files (one TUF
target per variant, made by :func:`pack_variant`).

Packing is deterministic: members sorted by path, regular files only, mtime 0, uid/gid 0, mode
0644, and a gzip header with mtime 0 and no file name. The same inputs give the same bytes, so the
hash of an archive is reproducible.

Unpacking trusts nothing in the archive. Each member must be a regular file or a directory with a
safe relative path (no absolute path, no ``..``, no backslash); links, devices and FIFOs are refused
outright (so no link can point outside); the number of members, each member's size and the total
are capped by :class:`ArchiveLimits` while counting the bytes actually written. The gzip stream is
read to its end so its CRC is checked, and only zero padding may follow the members. Extraction
goes into a temporary sibling directory that is renamed into place only when everything (including
the hash check against the manifest) succeeded, so a failed unpack leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bundles.canonical import sha256_bytes, sha256_file
from bundles.durable import atomic_file
from bundles.errors import ArchiveError, ConfigError, IntegrityError, ManifestError
from bundles.manifest import FileRef, Manifest, Variant

MANIFEST_NAME = "manifest.json"
_CHUNK_BYTES = 1 << 20
_FILE_MODE = 0o644
MAX_PADDING_BYTES = 1 << 20  # zero blocks after the last member (tar record padding is 10 KiB)
_DIR_MODE = 0o755


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied while unpacking; defaults fit models up to about 4 GiB (an LLM in q4)."""

    max_total_bytes: int = 8 << 30
    max_member_bytes: int = 8 << 30
    max_members: int = 10_000


# --- packing -------------------------------------------------------------------------------------


def pack_bundle(src_dir: str | Path, manifest: Manifest, out_path: str | Path) -> Path:
    """Pack ``manifest.json`` and every variant file of ``src_dir`` into a deterministic ``.efb``.

    The files are verified against the manifest first, so a bad bundle is never packed.
    """
    src = Path(src_dir)
    files = [f for v in manifest.variants for f in v.files]
    verify_files(src, files)
    members: list[tuple[str, bytes | Path]] = [(MANIFEST_NAME, manifest.to_bytes())]
    members += [(f.path, src / f.path) for f in files]
    return _write_archive(members, Path(out_path))


def pack_variant(bundle_dir: str | Path, manifest: Manifest, variant_id: str, out_path: str | Path) -> Path:
    """Pack just the files of one variant (verified first) into a deterministic tar.gz."""
    src = Path(bundle_dir)
    variant = manifest.variant(variant_id)
    verify_files(src, variant.files)
    members: list[tuple[str, bytes | Path]] = [(f.path, src / f.path) for f in variant.files]
    return _write_archive(members, Path(out_path))


def pack_members(members: list[tuple[str, bytes | Path]], out_path: str | Path) -> Path:
    """Write a deterministic tar.gz of ``members`` (archive path -> bytes or a local file), atomically.

    Files are streamed (models can be large). The one tar writer of edgefleet: bundles, variants and
    TUF publications all go through it.
    """
    out = Path(out_path)
    with atomic_file(out) as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, content in sorted(members, key=lambda m: m[0]):
                    _add_member(tar, name, content)
    return out


_write_archive = pack_members


def _add_member(tar: tarfile.TarFile, name: str, content: bytes | Path) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", _FILE_MODE
    if isinstance(content, bytes):
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
        return
    info.size = content.stat().st_size
    with open(content, "rb") as f:
        tar.addfile(info, f)


# --- unpacking -----------------------------------------------------------------------------------


def unpack(archive_path: str | Path, dest_dir: str | Path, limits: ArchiveLimits | None = None) -> list[str]:
    """Safely extract a tar.gz into ``dest_dir`` (which must not exist or be empty).

    Returns the relative paths of the extracted files, sorted. Raises :class:`ArchiveError` for an
    unsafe or unreadable archive; ``dest_dir`` is then left as it was.
    """
    with _staging(Path(dest_dir)) as stage:
        return _extract(Path(archive_path), stage, limits or ArchiveLimits())


def open_bundle(
    archive_path: str | Path,
    dest_dir: str | Path,
    limits: ArchiveLimits | None = None,
    expected_manifest_sha256: str | None = None,
) -> tuple[Manifest, Path]:
    """Unpack a ``.efb`` into ``dest_dir``, then check the manifest and every file against it.

    ``expected_manifest_sha256`` (from signed TUF metadata) authenticates ``manifest.json``; without
    it only the manifest's validity and the files' agreement with it are checked. Files that the
    manifest does not list are refused. Returns the manifest and ``dest_dir``.
    """
    dest = Path(dest_dir)
    with _staging(dest) as stage:
        extracted = _extract(Path(archive_path), stage, limits or ArchiveLimits())
        manifest = read_manifest(stage, expected_manifest_sha256)
        _check_listed_exactly(extracted, [MANIFEST_NAME] + [f.path for v in manifest.variants for f in v.files])
        verify_files(stage, [f for v in manifest.variants for f in v.files])
    return manifest, dest


def open_variant(
    archive_path: str | Path,
    dest_dir: str | Path,
    manifest: Manifest,
    variant_id: str,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Unpack one variant's tar.gz into ``dest_dir``, verify it, and write ``manifest.json`` beside it.

    The result is a bundle directory holding just that variant, loadable by the Predictor. Each
    member is checked against the variant's declared files *before* it is written (a path the
    manifest does not declare, or a size other than the declared one, stops the unpack at once),
    each file is cut off at its declared size, and the whole unpack at the declared total: a signed
    archive that is far bigger than its manifest says costs no more disk and time than the manifest.
    """
    variant: Variant = manifest.variant(variant_id)
    dest = Path(dest_dir)
    declared = {f.path: f.size_bytes for f in variant.files}
    with _staging(dest) as stage:
        extracted = _extract(Path(archive_path), stage, limits or ArchiveLimits(), declared)
        _check_listed_exactly(extracted, list(declared))
        verify_files(stage, variant.files)
        (stage / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    return dest


def read_manifest(bundle_dir: str | Path, expected_sha256: str | None = None) -> Manifest:
    """Read and validate ``manifest.json`` of a bundle directory, checking its hash if one is given."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from e
    if expected_sha256 is not None and sha256_bytes(raw) != expected_sha256:
        raise IntegrityError(f"file '{MANIFEST_NAME}': sha256 {sha256_bytes(raw)} differs from the expected one")
    return Manifest.from_bytes(raw)


def verify_files(root_dir: str | Path, files: Iterable[FileRef]) -> None:
    """Check that each file exists as a regular file with the manifest's size and sha256.

    Sizes are compared first (cheap), hashes after. Raises :class:`IntegrityError` naming the file.
    """
    root = Path(root_dir)
    for ref in files:
        path = root / ref.path
        try:
            st = path.lstat()
        except FileNotFoundError as e:
            raise IntegrityError(f"file '{ref.path}' is missing from {root}") from e
        if not path.is_file() or path.is_symlink():
            raise IntegrityError(f"file '{ref.path}' is not a regular file")
        if st.st_size != ref.size_bytes:
            raise IntegrityError(f"file '{ref.path}': {st.st_size} bytes, the manifest says {ref.size_bytes}")
        digest = sha256_file(path)
        if digest != ref.sha256:
            raise IntegrityError(f"file '{ref.path}': sha256 {digest} differs from the manifest's {ref.sha256}")


def max_archive_bytes(declared_sizes: Iterable[int]) -> int:
    """The largest honest tar.gz of files with these sizes (:func:`pack_variant` stays well below).

    Per member at most 2 KiB of tar headers (PAX header and padding), 10 KiB for the end of the
    archive and its record padding, and deflate's worst case on incompressible data (0.1 %). A
    variant archive whose signed length is above this cannot hold what the manifest declares,
    so it is refused before a byte of it is downloaded.
    """
    sizes = list(declared_sizes)
    payload = sum(sizes)
    return payload + payload // 1000 + 2048 * (len(sizes) + 1) + 16 * 1024


def _check_listed_exactly(extracted: list[str], listed: list[str]) -> None:
    unexpected = sorted(set(extracted) - set(listed))
    if unexpected:
        raise IntegrityError(f"archive holds files the manifest does not list: {', '.join(unexpected[:5])}")


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest`` that replaces it on success and is removed on failure."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"cannot unpack into {dest}: it exists and is not an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpacking-", dir=dest.parent))
    try:
        yield stage
        os.chmod(stage, _DIR_MODE)
        os.replace(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _Budget:
    """Counts members and bytes actually written against the limits (and the declared files, if any)."""

    def __init__(self, limits: ArchiveLimits, archive: Path, declared: Mapping[str, int] | None = None) -> None:
        self.archive, self.declared = archive, declared
        if declared is not None:  # the manifest's word is the limit, within the configured caps
            limits = ArchiveLimits(max_total_bytes=min(limits.max_total_bytes, sum(declared.values())),
                                   max_member_bytes=limits.max_member_bytes,
                                   max_members=limits.max_members)  # fmt: skip
        self.limits = limits
        self.members = 0
        self.total_bytes = 0
        self.padding_bytes = 0

    def add_member(self, name: str, declared_bytes: int, is_file: bool = True) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(f"{self.archive.name}: more than {self.limits.max_members} members")
        if declared_bytes > self.limits.max_member_bytes:
            raise ArchiveError(f"{self.archive.name}: member '{name}' exceeds {self.limits.max_member_bytes} bytes")
        if self.declared is not None and is_file:
            self._check_declared(name, declared_bytes)

    def _check_declared(self, name: str, header_bytes: int) -> None:
        """Refuse a member the manifest does not declare, or of another size, before writing a byte of it."""
        assert self.declared is not None
        if name not in self.declared:
            raise IntegrityError(f"{self.archive.name}: member '{name}' is not a file the manifest declares")
        if header_bytes != self.declared[name]:
            raise IntegrityError(
                f"{self.archive.name}: member '{name}' is {header_bytes} bytes, the manifest declares "
                f"{self.declared[name]}"
            )

    def member_cap(self, name: str) -> int:
        """The most bytes member ``name`` may have: its declared size, else the per-member limit."""
        if self.declared is not None and name in self.declared:
            return self.declared[name]
        return self.limits.max_member_bytes

    def add_bytes(self, name: str, member_bytes: int, count: int) -> None:
        self.total_bytes += count
        if member_bytes > self.member_cap(name):
            raise ArchiveError(f"{self.archive.name}: member '{name}' exceeds {self.member_cap(name)} bytes")
        if self.total_bytes > self.limits.max_total_bytes:
            raise ArchiveError(f"{self.archive.name}: content exceeds {self.limits.max_total_bytes} bytes")

    def add_padding(self, count: int) -> None:
        self.padding_bytes += count
        if self.padding_bytes > MAX_PADDING_BYTES:
            raise ArchiveError(f"{self.archive.name}: more than {MAX_PADDING_BYTES} bytes after the last member")


def _extract(archive: Path, root: Path, limits: ArchiveLimits, declared: Mapping[str, int] | None = None) -> list[str]:
    """Extract every member of ``archive`` under ``root`` with all the safety checks."""
    budget = _Budget(limits, archive, declared)
    max_file_bytes = limits.max_total_bytes if declared is None else max_archive_bytes(declared.values())
    try:
        if archive.stat().st_size > max_file_bytes:
            raise ArchiveError(f"{archive.name}: archive file exceeds {max_file_bytes} bytes")
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            reader = _LastReadKeeper(gz)
            files = _extract_members(reader, root, budget)
            if reader.last.strip(b"\0"):
                raise ArchiveError(f"{archive.name}: data after the end of the archive")
            _drain(gz, budget)
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError) and e.filename == str(archive):
            raise ArchiveError(f"archive {archive} does not exist") from e
        raise ArchiveError(f"{archive.name} is not a readable tar.gz archive: {e}") from e
    return sorted(files)


class _LastReadKeeper:
    """A file wrapper that remembers the last block read: the one at which tarfile stopped.

    tarfile ends quietly at a block that is not a valid header; keeping that block lets us tell the
    zero block that really ends an archive from data smuggled after the members.
    """

    def __init__(self, raw: gzip.GzipFile) -> None:
        self._raw = raw
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.last = data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _extract_members(gz: _LastReadKeeper, root: Path, budget: _Budget) -> list[str]:
    files: list[str] = []
    seen: set[str] = set()
    with tarfile.open(fileobj=gz, mode="r:") as tar:  # type: ignore[call-overload]
        for member in tar:
            name = _safe_name(member, budget.archive)
            budget.add_member(name, member.size, is_file=not member.isdir())
            if name in seen:
                raise ArchiveError(f"{budget.archive.name}: member '{name}' appears twice")
            seen.add(name)
            if member.isdir():
                (root / name).mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                continue
            _write_member(tar, member, root, name, budget)
            files.append(name)
    return files


def _safe_name(member: tarfile.TarInfo, archive: Path) -> str:
    """The member's normalised relative path, or an :class:`ArchiveError` if it is unsafe."""
    if not (member.isreg() or member.isdir()) or member.issparse():
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise ArchiveError(f"{archive.name}: member '{member.name}' is a {kind}; only regular files are allowed")
    name = member.name
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive.name}: member '{name}' has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{archive.name}: member '{name}' escapes the destination (path traversal)")
    if not parts:
        if member.isdir():
            return "."
        raise ArchiveError(f"{archive.name}: member with an empty name")
    return "/".join(parts)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, name: str, budget: _Budget) -> None:
    target = root / name
    target.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"{budget.archive.name}: member '{name}' has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    written = 0
    with os.fdopen(os.open(target, flags, _FILE_MODE), "wb") as out:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            budget.add_bytes(name, written, len(chunk))
            out.write(chunk)


def _drain(gz: gzip.GzipFile, budget: _Budget) -> None:
    """Read the gzip stream to its end so its CRC and length are checked; only zero padding may follow."""
    while chunk := gz.read(_CHUNK_BYTES):
        budget.add_padding(len(chunk))
        if chunk.strip(b"\0"):
            raise ArchiveError(f"{budget.archive.name}: data after the end of the archive")


__all__ = [
    "MANIFEST_NAME",
    "ArchiveLimits",
    "open_bundle",
    "open_variant",
    "pack_bundle",
    "pack_members",
    "pack_variant",
    "read_manifest",
    "unpack",
    "max_archive_bytes",
    "verify_files",
]
