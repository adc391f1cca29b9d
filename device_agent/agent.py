"""The agent as an application sees it: ``Agent.from_config()`` then ``agent.predict(...)``.

An :class:`Agent` owns the local engine (the served predictor of each model), the serving pipeline
(local answer, else the fallback chain, with telemetry on every answer) and the updater (A/B slots
and the update state machine). In an app process, the agent serves the *committed* slot of each
model and notices when the daemon commits a new one (it checks the slot pointers at most once a
second). In the daemon (``edgefleet-agent run``), the same object is driven by
:class:`device_agent.daemon.Daemon`, which also runs the updates and the localhost HTTP API.

Example::

    from device_agent import Agent
    agent = Agent.from_config()
    result = agent.predict({"x": image})   # result.outputs, result.source ("local" | "cloud" | ...)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConfigError, InputError, ModelNotReadyError
from bundles.selection import DeviceCapabilities, probe_capabilities
from device_agent.config import AgentConfig, load_config
from device_agent.identity import Enrollment
from device_agent.inference import LocalEngine
from device_agent.serving import PredictResult, ServingConfig, ServingPipeline
from device_agent.update.record import DeploymentRecord
from device_agent.update.states import DeploymentStatus
from device_agent.updater import Updater
from device_agent.version import AGENT_VERSION

log = logging.getLogger(__name__)

_RESULTS = {DeploymentStatus.INSTALLED: "installed", DeploymentStatus.ROLLED_BACK: "rolled_back"}


class TelemetryReporter:
    """Sends install reports through the telemetry recorder's offline buffer."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def report(self, record: DeploymentRecord) -> None:
        from device_agent.telemetry.events import install_event

        result = _RESULTS.get(record.status, "failed")
        event = install_event(
            record.model, record.version, result, record.previous_version, record.rollout_id, record.error,
            [h.split(":", 1)[0] for h in record.history if not h.startswith("resume")],
        )  # fmt: skip
        event.update(id=record.deployment_id, status=record.status.value, variant=record.selected_variant,
                     health=record.health, error_kind=record.error_kind, downgrade=is_downgrade(record))  # fmt: skip
        if self.recorder is not None:
            self.recorder.event(event)


def is_downgrade(record: DeploymentRecord) -> bool:
    """Was the device directed to an older version than it ran (a rollback by the director, allowed
    above the release floor: reported as such so that the server's history says so)?"""
    return record.previous_version is not None and record.version < record.previous_version


def _open_telemetry(config: AgentConfig) -> Any:
    """The telemetry recorder on ``<state_dir>/telemetry.db`` (None if it cannot be opened here)."""
    try:
        from device_agent.telemetry.buffer import TelemetryBuffer
        from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings

        settings = TelemetrySettings()
        buffer = TelemetryBuffer(config.state_dir / "telemetry.db", settings.buffer_cap_bytes)
        return TelemetryRecorder(buffer, settings)
    except Exception as e:  # a read-only state dir in an app process: serve without telemetry
        log.warning("telemetry disabled: %s", e)
        return None


class Agent:
    """Local inference with fallback and telemetry, plus the update flow (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        engine: LocalEngine,
        pipeline: ServingPipeline,
        updater: Updater,
        recorder: Any = None,
        capabilities: DeviceCapabilities | None = None,
        follow_pointers: bool = True,
    ) -> None:
        self.config, self.engine, self.pipeline, self.updater = config, engine, pipeline, updater
        self.recorder = recorder
        self.capabilities = capabilities or probe_capabilities(config.state_dir)
        self.follow_pointers = follow_pointers
        self.started_at = time.time()
        self._pointer_stamp: dict[str, int] = {}
        self._checked_at = 0.0

    @classmethod
    def from_config(
        cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Agent:
        """Build an agent from the TOML file and environment (see :func:`device_agent.config.load_config`)."""
        return cls.build(load_config(path, environ, **overrides))

    @classmethod
    def build(cls, config: AgentConfig, follow_pointers: bool = True, telemetry: bool = True) -> Agent:
        """Assemble engine, pipeline and updater for ``config``, serving the committed models."""
        config.ensure_state_dir()
        caps = probe_capabilities(config.state_dir)
        engine = LocalEngine(config.threads, config.max_concurrency, config.max_waiting, config.queue_timeout_s, caps)
        recorder = _open_telemetry(config) if telemetry else None
        pipeline = ServingPipeline(engine, ServingConfig(), recorder=recorder)
        updater = Updater(config, engine, lambda: caps, TelemetryReporter(recorder))
        agent = cls(config, engine, pipeline, updater, recorder, caps, follow_pointers)
        if follow_pointers:
            agent.reload_committed()
        return agent

    # --- predictions ------------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any], model: str | None = None) -> PredictResult:
        """One prediction: ``inputs`` maps input names to arrays (batch first).

        Raises:
            InputError: the inputs do not fit the model.
            ModelNotReadyError: no such model, and no fallback could answer.
            BusyError / InferenceError: the device is saturated or the whole chain failed.
        """
        name = self._model_name(model)
        return self.pipeline.predict(name, _as_arrays(inputs))

    def predict_batch(self, batch: Sequence[Mapping[str, Any]], model: str | None = None) -> list[PredictResult]:
        """Several predictions on the same model, each with its own provenance."""
        name = self._model_name(model)
        return self.pipeline.predict_batch(name, [_as_arrays(inputs) for inputs in batch])

    def _model_name(self, model: str | None) -> str:
        if self.follow_pointers and time.monotonic() - self._checked_at >= 1.0:
            self._maybe_reload()
        if model is not None:
            return model
        only = self.engine.only_model()
        if only is not None:
            return only
        models = self.engine.models()
        if len(models) == 1:
            return models[0]
        if not models:
            raise ModelNotReadyError("no model is installed on this device yet")
        raise ConfigError(f"several models are installed ({', '.join(models)}): pass model=...")

    # --- following the daemon's commits -------------------------------------------------------------

    def reload_committed(self) -> None:
        """Serve the committed slot of every model (what an app process should run)."""
        for name in self.updater.slots.models():
            slots = self.updater.slots.model(name)
            committed = slots.pointer().committed
            info = slots.info(committed)
            self._pointer_stamp[name] = _stamp(slots.pointer_path)
            if committed is None or info is None:
                continue
            if self.engine.serving_dir(name) != slots.slot_dir(committed):
                try:
                    self.engine.load(name, slots.slot_dir(committed), info.variant)
                except Exception as e:  # a damaged slot: keep serving what is loaded
                    log.error("cannot load %s from slot %s: %s", name, committed, e)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        stamps = {name: _stamp(self.updater.slots.model(name).pointer_path) for name in self.updater.slots.models()}
        if stamps != self._pointer_stamp:
            self.reload_committed()

    # --- status -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Active and previous bundle per model, last update result, health and queue."""
        enrollment = Enrollment.load(self.config.identity_dir)
        in_progress = self.updater.in_progress()
        engine = self.engine.describe()
        models: dict[str, dict[str, Any]] = {}
        for line in self.updater.installed():
            entry = models.setdefault(line["name"], {"slots": [], "ready": self.engine.ready(line["name"])})
            entry["slots"].append(line)
        for name, served in engine["models"].items():
            models.setdefault(name, {"slots": [], "ready": True})["served"] = served
        return {
            "agent_version": AGENT_VERSION,
            "device_id": None if enrollment is None else enrollment.device_id,
            "server_url": None if enrollment is None else enrollment.server_url,
            "enrollment_status": None if enrollment is None else enrollment.status,
            "models": models,
            "last_update": self.updater.last_result(),
            "update_in_progress": None if in_progress is None else in_progress.value,
            "failed_targets": self.updater.failed.all(),
            "health": "ok" if models and all(m["ready"] for m in models.values()) else "no-model",
            "queue": engine["queue"],
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def inventory(self) -> dict[str, Any]:
        """What the server's inventory endpoint takes."""
        caps = probe_capabilities(self.config.state_dir)
        return {"capabilities": caps.to_dict(), "installed": self.updater.installed(), "agent_version": AGENT_VERSION}

    def close(self) -> None:
        """Flush telemetry and release the models."""
        if self.recorder is not None:
            try:
                self.recorder.flush()
            except Exception as e:  # closing must not fail the caller
                log.warning("telemetry flush at close failed: %s", e)
        self.pipeline.close()
        self.engine.close()


def _stamp(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _as_arrays(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inputs as a dict of arrays; a dict of arrays already is passed through (nothing mutates it)."""
    if type(inputs) is dict:
        if len(inputs) == 1:  # the common case, without a generator
            for value in inputs.values():
                if type(value) is np.ndarray:
                    return inputs
        elif all(type(v) is np.ndarray for v in inputs.values()):
            return inputs
    if not isinstance(inputs, Mapping):
        raise InputError("inputs must map input names to arrays, e.g. {'x': array}")
    return {str(k): v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in inputs.items()}
