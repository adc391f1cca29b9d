"""The work of each update state, as small idempotent functions ``(record) -> Event``.

Each step may run again after a power cut (see ``RESUME`` in ``machine``), so each one checks what
is already done before doing it. The steps touch the device only through three seams: the A/B
slots (:mod:`device_agent.slots`), the signed source (:class:`~device_agent.update.source.BundleSource`)
and the model host (the inference engine, which loads a slot and runs the health check).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bundles.archive import ArchiveLimits, max_archive_bytes
from bundles.canonical import sha256_bytes
from bundles.errors import (
    BelowFloorError,
    InstallError,
    IntegrityError,
    MixAndMatchError,
    NoCompatibleVariantError,
)
from bundles.manifest import Manifest, Variant
from bundles.selection import DeviceCapabilities, rejection_reasons, select_variant, validated_runtime_for
from device_agent.config import AgentConfig
from device_agent.failed import FailedTargets
from device_agent.slots import ModelSlots, SlotStore
from device_agent.update.backoff import failed_before_change
from device_agent.update.record import DeploymentRecord
from device_agent.update.source import BundleSource, variant_target
from device_agent.update.states import DeploymentStatus, Event, UpdateState


class ModelHost(Protocol):
    """What the steps need from the inference engine."""

    def load(self, model: str, bundle_dir: Path, variant: str, keep_current: bool = True) -> None:
        """Load the bundle in ``bundle_dir`` and serve it (requests in flight finish on the old one).

        With ``keep_current`` the bundle served until now stays loaded as the previous one.
        """

    def serving_dir(self, model: str) -> Path | None:
        """The bundle directory the model is served from now."""

    def load_candidate(self, model: str, bundle_dir: Path, variant: str) -> None:
        """Load a bundle on trial beside the served one; it answers no request until promoted."""

    def candidate_dir(self, model: str) -> Path | None:
        """The bundle directory of the bundle on trial."""

    def promote(self, model: str) -> None:
        """Serve the bundle on trial (requests in flight finish on the old one)."""

    def drop_candidate(self, model: str) -> None:
        """Forget the bundle on trial."""

    def health_check(self, model: str) -> dict[str, Any]:
        """Self-test plus latency and memory budgets of the bundle on trial; raises on failure."""

    def unload(self, model: str) -> None:
        """Stop serving ``model``."""


class Reporter(Protocol):
    """Queues the install report of a finished deployment (never blocks on the network)."""

    def report(self, record: DeploymentRecord) -> None: ...


class UpdateSteps:
    """One method per state; :meth:`table` maps states to them for the machine."""

    def __init__(
        self,
        config: AgentConfig,
        slots: SlotStore,
        source: BundleSource,
        host: ModelHost,
        capabilities: Callable[[], DeviceCapabilities],
        failed: FailedTargets,
        reporter: Reporter,
    ) -> None:
        self.config, self.slots, self.source, self.host = config, slots, source, host
        self.capabilities, self.failed, self.reporter = capabilities, failed, reporter

    def table(self) -> dict[UpdateState, Callable[[DeploymentRecord], Event]]:
        s = UpdateState
        return {
            s.SYNC: self.sync, s.DOWNLOAD: self.download, s.VERIFY_BUNDLE: self.verify_bundle,
            s.STAGE: self.stage, s.ACTIVATE: self.activate, s.HEALTH_CHECK: self.health_check,
            s.COMMIT: self.commit, s.CHECK_ROLLBACK: self.check_rollback, s.ROLLBACK: self.rollback,
            s.FAILURE: self.failure, s.CLEANUP: self.cleanup, s.REPORT: self.report,
            s.LOOP_ABORT: self.loop_abort,
        }  # fmt: skip

    # --- helpers -----------------------------------------------------------------------------------

    def _model(self, record: DeploymentRecord) -> ModelSlots:
        return self.slots.model(record.model)

    def _work_dir(self, record: DeploymentRecord) -> Path:
        return self.config.state_dir / "work" / record.deployment_id

    def _manifest_bytes(self, record: DeploymentRecord) -> bytes:
        raw = (self._work_dir(record) / "manifest.json").read_bytes()
        if sha256_bytes(raw) != record.manifest_sha256:
            raise IntegrityError(f"{record.ref}: the saved manifest changed on disk since it was verified")
        return raw

    def _serve(self, model: ModelSlots, slot: str, keep_current: bool = True) -> None:
        """Make the engine serve ``slot`` unless it already does."""
        info = model.info(slot)
        if info is None:
            raise InstallError(f"{model.name}: slot '{slot}' holds no verified bundle")
        if self.host.serving_dir(model.name) != model.slot_dir(slot):
            self.host.load(model.name, model.slot_dir(slot), info.variant, keep_current)

    def _choose_variant(self, record: DeploymentRecord, manifest: Manifest) -> Variant:
        """The directed variant (or this device's best), and the runtime it was validated on that runs it here."""
        caps = self.capabilities()
        if record.variant is None:
            variant = select_variant(manifest, caps)
        else:
            variant = manifest.variant(record.variant)
            reasons = rejection_reasons(variant, caps)
            if reasons:
                why = "; ".join(reasons)
                raise NoCompatibleVariantError(f"{record.ref}: variant {variant.id} cannot run here: {why}",
                                               {variant.id: reasons})  # fmt: skip
        record.selected_runtime = validated_runtime_for(variant, caps)
        record.selected_runtime_version = caps.runtimes.get(record.selected_runtime or "")
        return variant

    def _check_floor(self, record: DeploymentRecord) -> None:
        """Refuse a version below the minimum the release key signed for this model.

        The floor travels in the signed targets (``custom.edgefleet.min_version`` of the model's
        targets), so a director (the fleet server) cannot lower it; above it, going back is allowed.
        """
        edgefleet = self.source.target_custom(record.manifest_target).get("edgefleet")
        floor = edgefleet.get("min_version") if isinstance(edgefleet, dict) else None
        if isinstance(floor, int) and not isinstance(floor, bool) and record.version < floor:
            raise BelowFloorError(
                f"{record.ref}: the release key set the minimum version of {record.model} to {floor}; "
                f"refusing to install version {record.version}"
            )

    def _check_archive_length(self, record: DeploymentRecord, variant: Variant, archive_bytes: int) -> None:
        """Refuse, before downloading it, an archive too big to hold only the files the manifest declares."""
        bound = max_archive_bytes(f.size_bytes for f in variant.files)
        if archive_bytes > bound:
            raise IntegrityError(
                f"{record.ref}: the signed archive of variant {variant.id} is {archive_bytes} bytes, more than "
                f"{bound} for the {variant.size_bytes} bytes of files its manifest declares; not downloaded"
            )

    def _check_disk(self, record: DeploymentRecord, archive_bytes: int, unpacked_bytes: int) -> None:
        if archive_bytes > self.config.max_bundle_bytes:
            limit = self.config.max_bundle_bytes
            raise InstallError(f"{record.ref}: the archive is {archive_bytes} bytes, over max_bundle_bytes={limit}")
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.config.state_dir).free
        needed = archive_bytes + unpacked_bytes + self.config.min_free_disk_bytes
        if free < needed:
            raise InstallError(f"{record.ref}: {free} bytes free on disk, the install needs {needed}")

    # --- the states --------------------------------------------------------------------------------

    def sync(self, record: DeploymentRecord) -> Event:
        """Decide whether the target is new; remember what to roll back to."""
        model = self._model(record)
        pointer = model.pointer()
        committed = model.info(pointer.committed)
        same_variant = record.variant is None or (committed is not None and committed.variant == record.variant)
        if committed is not None and committed.version == record.version and same_variant:
            return Event.NOTHING_TO_DO
        if self.failed.reason(record.ref) is not None:
            return Event.NOTHING_TO_DO
        record.previous_slot = pointer.committed
        record.previous_version = None if committed is None else committed.version
        return Event.SUCCESS

    def download(self, record: DeploymentRecord) -> Event:
        """Fetch the signed manifest, select the variant, check space, fetch only that archive."""
        self.source.refresh()
        self._check_floor(record)
        raw = self.source.fetch(record.manifest_target).read_bytes()
        manifest = Manifest.from_bytes(raw)
        if (manifest.name, manifest.version) != (record.model, record.version):
            raise MixAndMatchError(f"target {record.manifest_target} holds {manifest.ref}, not {record.ref}")
        try:
            variant = self._choose_variant(record, manifest)
        except NoCompatibleVariantError:
            record.status = DeploymentStatus.INCOMPATIBLE
            raise
        work = self._work_dir(record)
        work.mkdir(parents=True, exist_ok=True)
        (work / "manifest.json").write_bytes(raw)
        record.manifest_sha256, record.selected_variant = sha256_bytes(raw), variant.id
        model = self._model(record)
        if model.holds(model.staging_slot(), raw, variant.id):
            return Event.SUCCESS  # the previous slot holds this very bundle: nothing to download
        target = variant_target(record.manifest_target, variant.id)
        archive_bytes = self.source.target_length(target)
        self._check_archive_length(record, variant, archive_bytes)
        self._check_disk(record, archive_bytes, variant.size_bytes)
        record.archive_path = str(self.source.fetch(target))
        return Event.SUCCESS

    def verify_bundle(self, record: DeploymentRecord) -> Event:
        """Re-check what was downloaded (it may sit on disk for a while) and pick the slot."""
        raw = self._manifest_bytes(record)
        assert record.selected_variant is not None
        variant = Manifest.from_bytes(raw).variant(record.selected_variant)
        reasons = rejection_reasons(variant, self.capabilities())
        if reasons:
            record.status = DeploymentStatus.INCOMPATIBLE
            raise NoCompatibleVariantError(f"{record.ref}: {'; '.join(reasons)}", {variant.id: reasons})
        model = self._model(record)
        record.slot = model.staging_slot()
        if record.archive_path is None:
            if not model.holds(record.slot, raw, variant.id):
                raise IntegrityError(f"{record.ref}: slot {record.slot} no longer holds the bundle to reuse")
            return Event.SUCCESS
        size = Path(record.archive_path).stat().st_size
        if size != self.source.target_length(variant_target(record.manifest_target, variant.id)):
            raise IntegrityError(f"{record.ref}: the archive is {size} bytes, its signed length differs")
        return Event.SUCCESS

    def stage(self, record: DeploymentRecord) -> Event:
        """Unpack the variant into the inactive slot (the served slot is never touched)."""
        assert record.slot is not None and record.selected_variant is not None
        limits = ArchiveLimits(
            max_total_bytes=self.config.max_bundle_bytes * 4,
            max_member_bytes=self.config.max_bundle_bytes * 4,
            max_members=self.config.max_archive_members,
        )
        archive = None if record.archive_path is None else Path(record.archive_path)
        manifest_bytes = self._manifest_bytes(record)
        self._model(record).stage(record.slot, archive, manifest_bytes, record.selected_variant, limits)
        return Event.SUCCESS

    def _load_candidate(self, model: ModelSlots, slot: str) -> None:
        info = model.info(slot)
        if info is None:
            raise InstallError(f"{model.name}: slot '{slot}' holds no verified bundle")
        if self.host.candidate_dir(model.name) != model.slot_dir(slot):
            self.host.load_candidate(model.name, model.slot_dir(slot), info.variant)

    def activate(self, record: DeploymentRecord) -> Event:
        """Flip the pointer to the new slot (on trial) and load it beside the served model."""
        assert record.slot is not None
        model = self._model(record)
        model.activate(record.slot)
        self._load_candidate(model, record.slot)
        return Event.SUCCESS

    def health_check(self, record: DeploymentRecord) -> Event:
        """Load + golden self-test + latency and memory budgets, on the bundle on trial."""
        assert record.slot is not None
        model = self._model(record)
        model.activate(record.slot)
        self._load_candidate(model, record.slot)
        record.health = self.host.health_check(record.model)
        return Event.SUCCESS

    def commit(self, record: DeploymentRecord) -> Event:
        """The new slot becomes the known-good one and is served; the old one is kept as ``previous``."""
        assert record.slot is not None
        model = self._model(record)
        model.commit(record.slot)
        if self.host.candidate_dir(record.model) == model.slot_dir(record.slot):
            self.host.promote(record.model)
        else:
            self._serve(model, record.slot)
        self.failed.discard(record.ref)
        return Event.SUCCESS

    def check_rollback(self, record: DeploymentRecord) -> Event:
        """Is there a committed, verified slot to go back to?"""
        model = self._model(record)
        committed = model.pointer().committed
        return Event.SUCCESS if model.info(committed) is not None else Event.NOTHING_TO_DO

    def rollback(self, record: DeploymentRecord) -> Event:
        """Serve the committed slot again (instant when the engine still holds it)."""
        model = self._model(record)
        self.host.drop_candidate(record.model)
        committed = model.rollback()
        if committed is None:
            raise InstallError(f"{record.model}: nothing committed to roll back to")
        self._serve(model, committed, keep_current=False)
        return Event.SUCCESS

    def failure(self, record: DeploymentRecord) -> Event:
        """Remember a permanent failure; never leave an uncommitted bundle served.

        A failure before the slots changed (download, verify, unpack) is not remembered here: the
        updater retries it with backoff (:mod:`device_agent.update.backoff`).
        """
        if record.error_kind != "transient" and not failed_before_change(record):
            self.failed.add(record.ref, record.error or "failed")
        self.host.drop_candidate(record.model)
        model = self._model(record)
        committed = model.rollback()
        if committed is None:
            self.host.unload(record.model)
        else:
            self._serve(model, committed, keep_current=False)
        return Event.SUCCESS

    def cleanup(self, record: DeploymentRecord) -> Event:
        """Remove the work files, a half-staged slot, and the archive unless a retry can reuse it."""
        shutil.rmtree(self._work_dir(record), ignore_errors=True)
        model = self._model(record)
        pointer = model.pointer()
        if record.slot is not None and record.slot not in (pointer.active, pointer.committed, pointer.previous):
            model.clear(record.slot)
        if record.archive_path is not None and record.error_kind != "transient":
            Path(record.archive_path).unlink(missing_ok=True)  # unpacked in a slot, or proved bad
        return Event.SUCCESS

    def report(self, record: DeploymentRecord) -> Event:
        """Queue the install report."""
        self.reporter.report(record)
        return Event.SUCCESS

    def loop_abort(self, record: DeploymentRecord) -> Event:
        """The deployment kept crashing: serve the committed slot and never retry this target."""
        self.failed.add(record.ref, record.error or "update loop detected")
        self.host.drop_candidate(record.model)
        model = self._model(record)
        committed = model.rollback()
        if committed is not None:
            self._serve(model, committed, keep_current=False)
        return Event.SUCCESS
