"""The updater: the A/B slots, the update machine and the engine put together for one device.

Start-up (:meth:`Updater.recover`): load every model's active slot into the engine, finish the
deployment a previous process left behind (the resume table decides how), then *settle*: outside a
deployment the served slot must be the committed one, so any other pointer is flipped back. After
that, :meth:`Updater.apply` takes a desired state from the server and runs one deployment per model
whose target differs from what is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bundles.selection import DeviceCapabilities
from device_agent.config import AgentConfig
from device_agent.failed import FailedTargets
from device_agent.inference import LocalEngine
from device_agent.persist import atomic_write_json, read_json
from device_agent.slots import SlotStore
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
    ) -> None:
        self.config, self.engine = config, engine
        self.slots = SlotStore(config.models_dir)
        self.failed = FailedTargets(config.state_dir / "failed.json")
        self.retries = RetrySchedule(config.state_dir / "retry.json", config.retry_initial_s, config.retry_max_s)
        self.steps = UpdateSteps(
            config, self.slots, source or NoSource(), EngineHost(engine, config), capabilities, self.failed, reporter
        )
        self.store = RecordStore(config.record_path, config.max_state_saves)
        self.machine = UpdateMachine(self.store, self.steps.table())
        self.last_result_path = config.state_dir / "last_update.json"

    def set_source(self, source: BundleSource) -> None:
        self.steps.source = source

    def load_installed(self) -> None:
        """Serve every model's committed slot (a slot on trial is never served before it passes)."""
        for name in self.slots.models():
            model = self.slots.model(name)
            committed = model.pointer().committed
            info = model.info(committed)
            if committed is None or info is None or self.engine.serving_dir(name) == model.slot_dir(committed):
                continue
            try:
                self.engine.load(name, model.slot_dir(committed), info.variant)
            except Exception as e:  # the resume and settle below repair what is broken
                log.error("cannot load %s from slot %s: %s", name, committed, e)

    def recover(self) -> DeploymentRecord | None:
        """Start-up: load, finish an interrupted deployment, settle the pointers."""
        remove_stray_temp_files(self.config.state_dir)
        self.load_installed()
        record = self.machine.resume()
        if record is not None:
            self._remember(record)
        self.settle()
        return record

    def settle(self) -> None:
        """Outside a deployment, serve the committed slot of every model (and only that)."""
        if self.store.load() is not None:
            return
        for name in self.slots.models():
            model = self.slots.model(name)
            self.engine.drop_candidate(name)
            changed = model.settle()
            committed = model.pointer().committed
            info = model.info(committed)
            if committed is None or info is None:
                self.engine.unload(name)
            elif changed or self.engine.serving_dir(name) != model.slot_dir(committed):
                self.engine.load(name, model.slot_dir(committed), info.variant, keep_current=False)

    def apply(self, desired: Mapping[str, Any]) -> list[DeploymentRecord]:
        """Run a deployment for each model of the desired state whose target is not committed.

        An entry whose ``start_after`` (ISO 8601) is still in the future waits for a later poll.
        """
        done = []
        for entry in desired.get("models", []):
            if _not_yet(entry.get("start_after")) or self._backing_off(entry):
                continue
            record = self.deploy(entry)
            self._schedule_retry(entry, record)
            if record.status is not DeploymentStatus.UP_TO_DATE:
                done.append(record)
        self.settle()
        return done

    def _backing_off(self, entry: Mapping[str, Any]) -> bool:
        wait_s = self.retries.wait_s(str(entry.get("name")), desired_target(entry))
        if wait_s > 0:
            log.debug("%s@%s failed before; next try in %.0f s", entry.get("name"), entry.get("version"), wait_s)
        return wait_s > 0

    def _schedule_retry(self, entry: Mapping[str, Any], record: DeploymentRecord) -> None:
        """A failure before the device changed waits (exponentially longer) for its next try."""
        if failed_before_change(record):
            delay_s = self.retries.failed(record.model, desired_target(entry), record.error)
            log.warning("deployment %s failed (%s); next try in %.0f s", record.ref, record.error, delay_s)
        else:
            self.retries.clear(record.model)

    def deploy(self, entry: Mapping[str, Any]) -> DeploymentRecord:
        """One deployment from a desired-state model entry (``name``, ``version``, ``manifest_target``...)."""
        record = DeploymentRecord.new(
            model=str(entry["name"]),
            version=int(entry["version"]),
            manifest_target=str(entry["manifest_target"]),
            rollout_id=entry.get("rollout_id"),
            variant=entry.get("variant"),
        )
        record = self.machine.deploy(record)
        if record.status is not DeploymentStatus.UP_TO_DATE:
            self._remember(record)
        return record

    def _remember(self, record: DeploymentRecord) -> None:
        result = {
            "model": record.model, "version": record.version, "status": record.status.value,
            "error": record.error, "deployment_id": record.deployment_id, "finished_at": time.time(),
            "health": record.health, "history": record.history,
        }  # fmt: skip
        atomic_write_json(self.last_result_path, result)

    def last_result(self) -> dict[str, Any] | None:
        data = read_json(self.last_result_path)
        return data if isinstance(data, dict) else None

    def installed(self) -> list[dict[str, Any]]:
        """Inventory lines: one per model and non-empty slot."""
        lines = []
        for name in self.slots.models():
            model = self.slots.model(name)
            pointer = model.pointer()
            for slot in ("a", "b"):
                info = model.info(slot)
                if info is not None:
                    state = _slot_state(slot, pointer.active, pointer.committed, pointer.previous)
                    lines.append(
                        {"name": name, "version": info.version, "variant": info.variant, "slot": slot, "state": state}
                    )
        return lines

    def in_progress(self) -> UpdateState | None:
        record = self.store.load()
        return None if record is None else record.state


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
    removed = 0
    for pattern in (".*.tmp", "*/.*.tmp", "models/*/.*.tmp", "models/*/slot_*/.*.tmp"):
        for path in state_dir.glob(pattern):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _slot_state(slot: str, active: str | None, committed: str | None, previous: str | None) -> str:
    if slot == committed:
        return "active" if active == slot else "committed"
    if slot == active:
        return "trial"
    return "previous" if slot == previous else "staged"
