"""A/B model slots: where installed bundles live and which one is served.

Each model has a directory ``models/<name>/`` with two slots (``slot_a``, ``slot_b``) and a pointer
file ``pointer.json`` saying which slot is ``active`` (served now), which is ``committed`` (the last
one that passed its health check) and which is ``previous`` (the committed one before it, kept for an
instant rollback). A new bundle is staged into the slot that is not committed, so the served model is
never touched; activation rewrites the pointer atomically (temp file, fsync, rename); rolling back
rewrites it again. A slot is only trusted when its marker ``slot.json`` exists: it is written last,
after every file was verified and fsynced.

Outside a deployment ``active == committed``; :meth:`ModelSlots.settle` restores that after a crash.

Both files are read through :class:`device_agent.statefiles.StateFiles` with their contract models
(``SlotPointer``, ``SlotMarker``). A damaged pointer is set aside and rebuilt from the slots that
verify (the newest one is committed); a damaged marker is rebuilt when the slot's files still match
its ``manifest.json``, else the slot counts as empty. :meth:`ModelSlots.verify` is the full check
(marker, manifest hash, every file's size and sha256) that start-up runs on the committed slot.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from bundles.archive import ArchiveLimits, open_variant, verify_files
from bundles.canonical import sha256_bytes
from bundles.contract import SlotMarker, SlotPointer
from bundles.durable import fsync_dir, fsync_tree
from bundles.errors import BundleError, InstallError
from bundles.manifest import Manifest
from device_agent.statefiles import StateFiles

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
MARKER = "slot.json"
Pointer = SlotPointer
SlotInfo = SlotMarker


def other(slot: str | None) -> str:
    """The other slot of the pair (``a`` when there is none yet)."""
    return "b" if slot == "a" else "a"


class ModelSlots:
    """The two slots and the pointer of one model."""

    def __init__(self, models_dir: Path, name: str, files: StateFiles | None = None) -> None:
        self.name = name
        self.root = models_dir / name
        self.pointer_path = self.root / "pointer.json"
        self.files = files or StateFiles(models_dir.parent)

    def slot_dir(self, slot: str) -> Path:
        return self.root / f"slot_{slot}"

    def pointer(self) -> Pointer:
        """The pointer; a damaged one is set aside and rebuilt from the slots that verify."""
        found: Pointer = self.files.load(self.pointer_path, SlotPointer, SlotPointer(), self._rebuilt_pointer,
                                         "rebuilt from the slots that verify (the newest is committed)")  # fmt: skip
        return found

    def _write_pointer(self, pointer: Pointer) -> None:
        self.files.save(self.pointer_path, pointer)

    def _rebuilt_pointer(self) -> Pointer:
        good = [(info.version, slot) for slot in SLOTS if (info := self.info(slot)) and self.verify(slot) is None]
        if not good:
            return SlotPointer()
        newest = max(good)[1]
        pointer = SlotPointer(newest, newest, other(newest) if len(good) == 2 else None)
        self._write_pointer(pointer)
        return pointer

    def info(self, slot: str | None) -> SlotInfo | None:
        """The marker of ``slot``, or ``None`` if the slot is empty or was never completed."""
        if slot is None:
            return None
        path = self.slot_dir(slot) / MARKER
        action = "rebuilt from the slot's manifest if its files still match it"
        found: SlotInfo | None = self.files.load(path, SlotMarker, None, lambda: self._rebuilt_marker(slot), action)
        return found

    def _rebuilt_marker(self, slot: str) -> SlotInfo | None:
        """A marker for the variant whose files in ``slot`` all match the slot's manifest (else None)."""
        try:
            raw = (self.slot_dir(slot) / "manifest.json").read_bytes()
            manifest = Manifest.from_bytes(raw)
        except (OSError, BundleError):
            return None
        for variant in manifest.variants:
            try:
                verify_files(self.slot_dir(slot), variant.files)
            except BundleError:
                continue
            marker = SlotMarker(slot, manifest.name, manifest.version, variant.id, sha256_bytes(raw))
            self.files.save(self.slot_dir(slot) / MARKER, marker)
            return marker
        return None

    def restore_marker(self, slot: str) -> SlotInfo | None:
        """The committed slot lost its marker (it is written before the pointer names a slot): rebuild it."""
        if self.files.read_only or not self.slot_dir(slot).is_dir():
            return None
        marker = self._rebuilt_marker(slot)
        action = "rebuilt from the slot's manifest" if marker else "the slot's files do not match its manifest"
        self.files.missing(self.slot_dir(slot) / MARKER, action, self.name)
        return marker

    def verify(self, slot: str) -> str | None:
        """Why ``slot`` cannot be trusted (marker, manifest hash, every file), or ``None`` if it is intact."""
        info = self.info(slot)
        if info is None:
            return f"slot {slot} holds no completed bundle"
        try:
            raw = (self.slot_dir(slot) / "manifest.json").read_bytes()
            if sha256_bytes(raw) != info.manifest_sha256:
                return f"slot {slot}: manifest.json differs from the one that was verified at install"
            verify_files(self.slot_dir(slot), Manifest.from_bytes(raw).variant(info.variant).files)
        except OSError as e:
            return f"slot {slot}: {e.strerror or e}"
        except BundleError as e:
            return f"slot {slot}: {e}"
        return None

    def manifest(self, slot: str) -> Manifest:
        """The manifest stored in ``slot``."""
        return Manifest.from_bytes((self.slot_dir(slot) / "manifest.json").read_bytes())

    def set_aside(self, slot: str, reason: str, action: str) -> None:
        """Quarantine a damaged slot: its marker and manifest are kept for an engineer, the rest removed."""
        dest = self.slot_dir(slot)
        with contextlib.suppress(FileNotFoundError):
            (dest / MARKER).unlink()
            fsync_dir(dest)
        if self.files.read_only:
            return
        repair = self.files.quarantine(dest, reason, action, model=self.name)
        kept = None if repair.quarantined_as is None else self.files.state_dir / repair.quarantined_as
        if kept is not None and kept.is_dir():
            for path in sorted(kept.rglob("*"), reverse=True):
                if path.is_file() and path.name != "manifest.json":
                    path.unlink(missing_ok=True)
        self.clear(slot)

    def serve_only(self, slot: str | None) -> None:
        """After losing the committed slot: ``slot`` (verified) is served and committed, nothing else."""
        self._write_pointer(SlotPointer(slot, slot, None))

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
        fsync_tree(dest)
        marker = SlotInfo(slot, manifest.name, manifest.version, variant_id, sha256_bytes(manifest_bytes))
        self.files.save(dest / MARKER, marker)

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


class SlotStore:
    """All models' slots under ``models_dir``."""

    def __init__(self, models_dir: Path, files: StateFiles | None = None) -> None:
        self.models_dir = models_dir
        self.files = files or StateFiles(models_dir.parent)

    def model(self, name: str) -> ModelSlots:
        return ModelSlots(self.models_dir, name, self.files)

    def models(self) -> list[str]:
        """Names of the models that have a pointer file or a slot (a lost pointer is rebuilt from the slots)."""
        if not self.models_dir.exists():
            return []
        found = {p.parent.name for p in self.models_dir.glob("*/pointer.json")}
        found |= {p.parent.name for p in self.models_dir.glob("*/slot_[ab]") if p.is_dir()}
        return sorted(found)
