"""A/B model slots: where installed bundles live and which one is served.

Each model has a directory ``models/<name>/`` with two slots (``slot_a``, ``slot_b``) and a pointer
file ``pointer.json`` saying which slot is ``active`` (served now), which is ``committed`` (the last
one that passed its health check) and which is ``previous`` (the committed one before it, kept for an
instant rollback). A new bundle is staged into the slot that is not committed, so the served model is
never touched; activation rewrites the pointer atomically (temp file, fsync, rename); rolling back
rewrites it again. A slot is only trusted when its marker ``slot.json`` exists: it is written last,
after every file was verified and fsynced.

Outside a deployment ``active == committed``; :meth:`ModelSlots.settle` restores that after a crash.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bundles.archive import ArchiveLimits, open_variant, verify_files
from bundles.canonical import sha256_bytes
from bundles.errors import BundleError, InstallError
from bundles.manifest import Manifest
from device_agent.persist import atomic_write_json, fsync_dir, read_json

SLOTS = ("a", "b")
MARKER = "slot.json"


@dataclass(frozen=True)
class Pointer:
    """Which slot is served, which is known good, and which is kept for rollback (persisted)."""

    active: str | None = None
    committed: str | None = None
    previous: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Pointer:
        data = data or {}
        return cls(**{k: data.get(k) if data.get(k) in SLOTS else None for k in ("active", "committed", "previous")})


@dataclass(frozen=True)
class SlotInfo:
    """What a verified slot holds (the marker's content)."""

    slot: str
    name: str
    version: int
    variant: str
    manifest_sha256: str


def other(slot: str | None) -> str:
    """The other slot of the pair (``a`` when there is none yet)."""
    return "b" if slot == "a" else "a"


class ModelSlots:
    """The two slots and the pointer of one model."""

    def __init__(self, models_dir: Path, name: str) -> None:
        self.name = name
        self.root = models_dir / name
        self.pointer_path = self.root / "pointer.json"

    def slot_dir(self, slot: str) -> Path:
        return self.root / f"slot_{slot}"

    def pointer(self) -> Pointer:
        return Pointer.from_dict(read_json(self.pointer_path))

    def _write_pointer(self, pointer: Pointer) -> None:
        atomic_write_json(self.pointer_path, asdict(pointer))

    def info(self, slot: str | None) -> SlotInfo | None:
        """The marker of ``slot``, or ``None`` if the slot is empty or was never completed."""
        if slot is None:
            return None
        data = read_json(self.slot_dir(slot) / MARKER)
        return None if data is None else SlotInfo(**{k: data[k] for k in SlotInfo.__dataclass_fields__})

    def manifest(self, slot: str) -> Manifest:
        """The manifest stored in ``slot``."""
        return Manifest.from_bytes((self.slot_dir(slot) / "manifest.json").read_bytes())

    def staging_slot(self) -> str:
        """The slot a new bundle goes into: never the committed one."""
        return other(self.pointer().committed)

    # --- steps of a deployment (each idempotent) -----------------------------------------------------

    def stage(
        self, slot: str, archive: Path | None, manifest_bytes: bytes, variant_id: str, limits: ArchiveLimits
    ) -> None:
        """Unpack and verify one variant into ``slot``, then write its marker (the commit point).

        If the slot already holds exactly this bundle (same manifest hash, files intact) nothing is
        unpacked: that is how going back to the previous version is instant.
        """
        manifest = Manifest.from_bytes(manifest_bytes)
        if self.holds(slot, manifest_bytes, variant_id):
            return
        if archive is None:
            raise InstallError(f"{self.name}: slot '{slot}' does not hold {manifest.ref} and no archive was fetched")
        self._forget_previous(slot)
        self.clear(slot)
        dest = self.slot_dir(slot)
        open_variant(archive, dest, manifest, variant_id, limits)
        (dest / "manifest.json").write_bytes(manifest_bytes)
        _fsync_tree(dest)
        marker = SlotInfo(slot, manifest.name, manifest.version, variant_id, sha256_bytes(manifest_bytes))
        atomic_write_json(dest / MARKER, asdict(marker))

    def holds(self, slot: str, manifest_bytes: bytes, variant_id: str) -> bool:
        """Does ``slot`` hold exactly this bundle and variant, with every file intact?"""
        info = self.info(slot)
        if info is None or info.manifest_sha256 != sha256_bytes(manifest_bytes) or info.variant != variant_id:
            return False
        try:
            verify_files(self.slot_dir(slot), Manifest.from_bytes(manifest_bytes).variant(variant_id).files)
        except BundleError:  # a damaged or changed file: stage again
            return False
        return True

    def _forget_previous(self, slot: str) -> None:
        pointer = self.pointer()
        if slot in (pointer.committed, pointer.active):
            raise InstallError(f"{self.name}: refusing to stage into the served slot '{slot}'")
        if pointer.previous == slot:
            self._write_pointer(Pointer(pointer.active, pointer.committed, None))

    def clear(self, slot: str) -> None:
        """Empty ``slot`` (marker first, so a half-removed slot is never trusted)."""
        dest = self.slot_dir(slot)
        with contextlib.suppress(FileNotFoundError):
            (dest / MARKER).unlink()
            fsync_dir(dest)
        shutil.rmtree(dest, ignore_errors=True)
        for stray in self.root.glob(f".slot_{slot}.unpacking-*"):
            shutil.rmtree(stray, ignore_errors=True)

    def activate(self, slot: str) -> None:
        """Flip the pointer so ``slot`` is served (the committed slot stays the rollback target)."""
        if self.info(slot) is None:
            raise InstallError(f"{self.name}: slot '{slot}' holds no verified bundle")
        pointer = self.pointer()
        if pointer.active != slot:
            self._write_pointer(Pointer(slot, pointer.committed, pointer.previous))

    def commit(self, slot: str) -> None:
        """Make ``slot`` the known-good one; the old committed slot becomes ``previous``."""
        pointer = self.pointer()
        if pointer.committed == slot and pointer.active == slot:
            return
        previous = pointer.committed if pointer.committed != slot else pointer.previous
        self._write_pointer(Pointer(slot, slot, previous))

    def rollback(self) -> str | None:
        """Serve the committed slot again; returns it (``None`` when nothing was ever committed)."""
        pointer = self.pointer()
        if pointer.active != pointer.committed:
            self._write_pointer(Pointer(pointer.committed, pointer.committed, pointer.previous))
        return pointer.committed

    def settle(self) -> bool:
        """Outside a deployment: serve the committed slot. Returns True if the pointer had to change."""
        pointer = self.pointer()
        if pointer.active == pointer.committed:
            return False
        self.rollback()
        return True


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` so a staged slot survives a power cut."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


class SlotStore:
    """All models' slots under ``models_dir``."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir

    def model(self, name: str) -> ModelSlots:
        return ModelSlots(self.models_dir, name)

    def models(self) -> list[str]:
        """Names of the models that have a pointer file."""
        if not self.models_dir.exists():
            return []
        return sorted(p.parent.name for p in self.models_dir.glob("*/pointer.json"))
