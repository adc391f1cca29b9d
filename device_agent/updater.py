"""The updater: the A/B slots, the update machine and the engine put together for one device.

Start-up (:meth:`Updater.recover`): finish the deployment a previous process left behind (the
resume table decides how), *settle* (outside a deployment the served slot must be the committed one,
so any other pointer is flipped back), then *heal*: the committed slot of every model is verified
(marker, manifest hash, every file's sha256) before it is served. A slot that fails is set aside
(quarantine) and the other slot is served if it verifies and did not fail for good; otherwise the
model has nothing local: it is answered through the cloud fallback and its bundle is downloaded
again through TUF (:attr:`Updater.redownload`, taken by the daemon's next round). Every repair is
reported. Nothing here exits for damage it can work around: a model that cannot be loaded is logged
and left to the fallback chain, and ``status`` says so.

After that, :meth:`Updater.apply` takes a desired state from the server and runs one deployment per
model whose target differs from what is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bundles.contract import DesiredModel, DesiredState, LastUpdate, parse, to_dict
from bundles.durable import remove_stray_temp_files as remove_temp_files_in
from bundles.errors import EdgeFleetError
from bundles.manifest import Manifest
from bundles.selection import DeviceCapabilities, validated_runtime_for
from device_agent.config import AgentConfig
from device_agent.failed import FailedTargets
from device_agent.inference import LocalEngine
from device_agent.slots import SLOTS, ModelSlots, SlotStore, other
from device_agent.statefiles import StateFiles
from device_agent.update.backoff import RetrySchedule, desired_target, failed_before_change
from device_agent.update.machine import UpdateMachine
from device_agent.update.record import DeploymentRecord, RecordStore
from device_agent.update.source import BundleSource
from device_agent.update.states import DeploymentStatus, UpdateState
from device_agent.update.steps import Reporter, UpdateSteps

log = logging.getLogger(__name__)


class NoSource:
    """The source before enrollment: resuming never downloads, so this only explains itself."""

    def refresh(self) -> None:
        from bundles.errors import ConfigError

        raise ConfigError("this device is not enrolled: run 'edgefleet-agent enroll' first")

    def target_length(self, target_path: str) -> int:
        del target_path
        self.refresh()
        return 0

    def target_custom(self, target_path: str) -> dict[str, Any]:
        del target_path
        self.refresh()
        return {}

    def fetch(self, target_path: str) -> Path:
        del target_path
        self.refresh()
        return Path()


class EngineHost:
    """Adapts :class:`LocalEngine` to the steps' ``ModelHost`` with the configured health limits."""

    def __init__(self, engine: LocalEngine, config: AgentConfig) -> None:
        self.engine, self.config = engine, config

    def load(self, model: str, bundle_dir: Path, variant: str, keep_current: bool = True) -> None:
        self.engine.load(model, bundle_dir, variant, keep_current)

    def serving_dir(self, model: str) -> Path | None:
        return self.engine.serving_dir(model)

    def load_candidate(self, model: str, bundle_dir: Path, variant: str) -> None:
        self.engine.load_candidate(model, bundle_dir, variant)

    def candidate_dir(self, model: str) -> Path | None:
        return self.engine.candidate_dir(model)

    def promote(self, model: str) -> None:
        self.engine.promote(model)

    def drop_candidate(self, model: str) -> None:
        self.engine.drop_candidate(model)

    def health_check(self, model: str) -> dict[str, Any]:
        c = self.config
        return self.engine.health_check(model, c.health_runs, c.health_latency_slack, c.health_memory_slack)

    def unload(self, model: str) -> None:
        self.engine.unload(model)


class Updater:
    """Owns the deployment flow of one device."""

    def __init__(
        self,
        config: AgentConfig,
        engine: LocalEngine,
        capabilities: Callable[[], DeviceCapabilities],
        reporter: Reporter,
        source: BundleSource | None = None,
        files: StateFiles | None = None,
    ) -> None:
        self.config, self.engine = config, engine
        self.files = files or StateFiles(config.state_dir)
        self.slots = SlotStore(config.models_dir, self.files)
        self.failed = FailedTargets(config.state_dir / "failed.json", self.files)
        self.retries = RetrySchedule(
            config.state_dir / "retry.json", config.retry_initial_s, config.retry_max_s, files=self.files
        )
        self.steps = UpdateSteps(
            config, self.slots, source or NoSource(), EngineHost(engine, config), capabilities, self.failed, reporter
        )
        self.store = RecordStore(config.record_path, config.max_state_saves, self.files)
        self.machine = UpdateMachine(self.store, self.steps.table())
        self.last_result_path = config.state_dir / "last_update.json"
        self.redownload: dict[str, DesiredModel] = {}
        """Models whose committed bundle was lost at start and must come again through TUF."""
        self.problems: dict[str, str] = {}
        """Models that are installed but not served locally, and why (for ``status`` and readiness)."""
        self.recovered = False
        """True once start-up has verified and loaded what it could (readiness and requests wait for it)."""
        self.starting = False
        """True from :meth:`expect_recovery` (the daemon, before it serves HTTP) until :meth:`recover` ends."""
        self._recovered_event = threading.Event()

    def set_source(self, source: BundleSource) -> None:
        self.steps.source = source

    def recover(self) -> DeploymentRecord | None:
        """Start-up: finish an interrupted deployment, settle the pointers, verify and serve the committed slots."""
        remove_stray_temp_files(self.config.state_dir)
        record = None
        try:
            record = self.machine.resume()
        except Exception as e:  # noqa: BLE001 - a resume that cannot finish must not keep the device down
            log.error("could not resume the interrupted deployment (%s); serving the committed slots", e)
            self.store.clear()
        try:
            if record is not None:
                self._remember(record)
            self.settle()
        finally:  # requests waiting for start-up go on whatever happened
            self.mark_recovered()
        return record

    def expect_recovery(self) -> None:
        """Start-up begins (:meth:`recover` follows): requests wait for it (:meth:`wait_recovered`).

        The daemon serves HTTP before it verifies the slots (liveness, readiness that says why), so a
        request can come while a good slot is still being verified: it waits for it rather than being
        answered by the fallback chain, which would say 503 "not_ready" for a model about to serve.
        """
        self.starting = True

    def mark_recovered(self) -> None:
        """Start-up is over: what verifies is served; requests waiting for it go on."""
        self.recovered = True
        self.starting = False
        self._recovered_event.set()

    def wait_recovered(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a start-up in progress to end; whether none is in progress any more."""
        return not self.starting or self._recovered_event.wait(timeout_s)

    def settle(self) -> None:
        """Outside a deployment, serve the committed slot of every model (and only that), verified."""
        if self.store.load() is not None:
            return
        for name in self.slots.models():
            self.engine.drop_candidate(name)
            self.slots.model(name).settle()
            self.serve_committed(name)

    def serve_committed(self, name: str) -> None:
        """Serve the committed slot of ``name`` once it verifies; else heal (see the module docstring)."""
        model = self.slots.model(name)
        self._rebuild_lost_pointer(model)
        for _ in SLOTS:
            committed = model.pointer().committed
            if committed is None:
                break
            if self.engine.serving_dir(name) == model.slot_dir(committed):
                self.problems.pop(name, None)
                return
            if model.info(committed) is None:
                model.restore_marker(committed)
            problem = model.verify(committed)
            if problem is None:
                self._load(model, committed)
                return
            self._lose_slot(model, committed, problem)
        if self.engine.serving_dir(name) is not None:
            self.engine.unload(name)
        self.problems.setdefault(name, "nothing installed")

    def _load(self, model: ModelSlots, slot: str) -> None:
        info = model.info(slot)
        assert info is not None
        try:
            self.engine.load(model.name, model.slot_dir(slot), info.variant, keep_current=False, verify=False)
            self.problems.pop(model.name, None)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot load it: the fallback chain answers
            log.error("cannot serve %s from slot %s: %s", model.name, slot, e)
            self.problems[model.name] = f"cannot load v{info.version}: {e}"

    def _lose_slot(self, model: ModelSlots, slot: str, problem: str) -> None:
        """The committed slot failed verification: fall back to the other slot, else download it again."""
        lost = model.info(slot)
        standby = other(slot)
        spare = model.info(standby)
        usable = spare is not None and model.verify(standby) is None
        usable = usable and spare is not None and self.failed.reason(f"{model.name}@{spare.version}") is None
        if usable and spare is not None:
            action = f"serving v{spare.version} from slot {standby} instead"
        else:
            action = "serving through the cloud fallback until the bundle is downloaded again through TUF"
        model.set_aside(slot, problem, action)
        model.serve_only(standby if usable else None)
        if not usable and lost is not None:
            self.redownload[model.name] = self._entry_for(model.name, lost.version)
        self.problems[model.name] = f"committed slot {slot} failed verification: {problem}; {action}"

    def _rebuild_lost_pointer(self, model: ModelSlots) -> None:
        """A deleted ``pointer.json`` next to completed slots is damage too: rebuild it and report."""
        if model.pointer_path.exists() or self.files.read_only:
            return
        if not any(model.info(slot) is not None for slot in SLOTS):
            return
        action = "rebuilt from the slots that verify (the newest is committed)"
        self.files.missing(model.pointer_path, action, model.name)
        model._rebuilt_pointer()  # noqa: SLF001 - the slot store's own rebuild rule

    def _entry_for(self, name: str, version: int) -> DesiredModel:
        """The desired-state entry that brings ``name@version`` back (the saved one if it names it)."""
        desired = self.saved_desired()
        for entry in [] if desired is None else desired.models:
            if entry.name == name and entry.version == version:
                return entry
        return DesiredModel(name=name, version=version, manifest_target=f"{name}/{version}/manifest.json")

    def saved_desired(self) -> DesiredState | None:
        """The last desired state the daemon saved (``desired.json``), if any."""
        from bundles.contract import SavedDesiredState

        saved = self.files.load(self.config.state_dir / "desired.json", SavedDesiredState, SavedDesiredState())
        state: DesiredState | None = saved.state
        return state

    def known_models(self) -> list[str]:
        """Every model this device is meant to answer: installed, served, or named by the desired state."""
        names = set(self.slots.models()) | set(self.engine.models()) | set(self.redownload)
        desired = self.saved_desired()
        names |= set() if desired is None else {m.name for m in desired.models}
        return sorted(names)

    def apply(self, desired: DesiredState | Mapping[str, Any]) -> list[DeploymentRecord]:
        """Run a deployment for each model of the desired state whose target is not committed.

        An entry whose ``start_after`` (ISO 8601) is still in the future waits for a later poll. A
        bundle lost to damage at start (:attr:`redownload`) comes back here even when the desired
        state does not name it (the server may be unaware, or unreachable when it was lost).
        """
        state = desired if isinstance(desired, DesiredState) else parse(DesiredState, desired, "desired state")
        entries = list(state.models)
        named = {entry.name for entry in entries}
        entries += [entry for name, entry in self.redownload.items() if name not in named]
        done = []
        for entry in entries:
            if _not_yet(entry.start_after) or self._backing_off(entry):
                continue
            record = self.deploy(entry)
            self._schedule_retry(entry, record)
            if record.status in (DeploymentStatus.INSTALLED, DeploymentStatus.UP_TO_DATE):
                self.redownload.pop(entry.name, None)
            if record.status is not DeploymentStatus.UP_TO_DATE:
                done.append(record)
        self.settle()
        return done

    def _backing_off(self, entry: DesiredModel) -> bool:
        wait_s = self.retries.wait_s(entry.name, desired_target(entry))
        if wait_s > 0:
            log.debug("%s@%s failed before; next try in %.0f s", entry.name, entry.version, wait_s)
        return wait_s > 0

    def _schedule_retry(self, entry: DesiredModel, record: DeploymentRecord) -> None:
        """A failure before the device changed waits (exponentially longer) for its next try."""
        if failed_before_change(record):
            delay_s = self.retries.failed(record.model, desired_target(entry), record.error)
            log.warning("deployment %s failed (%s); next try in %.0f s", record.ref, record.error, delay_s)
        else:
            self.retries.clear(record.model)

    def deploy(self, entry: DesiredModel | Mapping[str, Any]) -> DeploymentRecord:
        """One deployment from a desired-state model entry (``name``, ``version``, ``manifest_target``...)."""
        target: DesiredModel = entry if isinstance(entry, DesiredModel) else parse(DesiredModel, entry, "model entry")
        record = DeploymentRecord.new(
            model=target.name, version=target.version, manifest_target=target.manifest_target,
            rollout_id=target.rollout_id, variant=target.variant,
        )  # fmt: skip
        record = self.machine.deploy(record)
        if record.status is not DeploymentStatus.UP_TO_DATE:
            self._remember(record)
        return record

    def _remember(self, record: DeploymentRecord) -> None:
        result = LastUpdate(
            model=record.model, version=record.version, status=record.status.value, error=record.error,
            deployment_id=record.deployment_id, finished_at=time.time(), health=record.health,
            history=record.history,
        )  # fmt: skip
        self.files.save(self.last_result_path, result)

    def last_result(self) -> dict[str, Any] | None:
        found = self.files.load(self.last_result_path, LastUpdate, None)
        return None if found is None else dict(to_dict(found))

    def installed(self) -> list[dict[str, Any]]:
        """Inventory lines: one per model and non-empty slot, with the runtime its variant runs on here.

        ``runtime`` is the runtime the variant was validated on that this device has (None when it has
        none: the line says so rather than hide the slot).
        """
        lines = []
        caps = self.steps.capabilities()
        for name in self.slots.models():
            model = self.slots.model(name)
            pointer = model.pointer()
            for slot in ("a", "b"):
                info = model.info(slot)
                if info is not None:
                    state = _slot_state(slot, pointer.active, pointer.committed, pointer.previous)
                    line = {"name": name, "version": info.version, "variant": info.variant, "slot": slot,
                            "state": state}  # fmt: skip
                    lines.append({**line, **_runtime_of(model.slot_dir(slot), info.variant, caps)})
        return lines

    def in_progress(self) -> UpdateState | None:
        record = self.store.load()
        return None if record is None else record.state


def _runtime_of(slot_dir: Path, variant_id: str, caps: DeviceCapabilities) -> dict[str, Any]:
    """``runtime`` / ``runtime_version`` the slot's variant runs on here (from its manifest)."""
    try:
        variant = Manifest.from_bytes((slot_dir / "manifest.json").read_bytes()).variant(variant_id)
    except (OSError, EdgeFleetError):
        return {"runtime": None, "runtime_version": None}
    runtime = validated_runtime_for(variant, caps)
    return {"runtime": runtime, "runtime_version": caps.runtimes.get(runtime or "")}


def _not_yet(start_after: Any) -> bool:
    """True when ``start_after`` names a moment still in the future (unparseable: do not wait)."""
    if not start_after:
        return False
    try:
        moment = dt.datetime.fromisoformat(str(start_after).replace("Z", "+00:00"))
    except ValueError:
        log.warning("ignoring unparseable start_after %r", start_after)
        return False
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment > dt.datetime.now(dt.timezone.utc)


def remove_stray_temp_files(state_dir: Path) -> int:
    """Delete the temporary files of atomic writes that a power cut interrupted (``.<name>.*.tmp``)."""
    directories = [state_dir, *state_dir.glob("*/"), *state_dir.glob("models/*/"), *state_dir.glob("models/*/slot_*/")]
    return remove_temp_files_in(d for d in directories if d.is_dir())


def _slot_state(slot: str, active: str | None, committed: str | None, previous: str | None) -> str:
    if slot == committed:
        return "active" if active == slot else "committed"
    if slot == active:
        return "trial"
    return "previous" if slot == previous else "staged"
