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

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundles.contract import EnrollmentRecord, FallbackSection, parse
from bundles.errors import ConfigError, InputError, ModelNotReadyError
from bundles.selection import DeviceCapabilities
from device_agent.capabilities import device_capabilities
from device_agent.config import AgentConfig, load_config
from device_agent.identity import Enrollment
from device_agent.inference import LocalEngine
from device_agent.serving import PredictResult, ServingConfig, ServingPipeline
from device_agent.statefiles import StateFiles
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
            id=record.deployment_id, status=record.status.value, variant=record.selected_variant,
            runtime=record.selected_runtime, runtime_version=record.selected_runtime_version,
            health=_bounded_health(record.health), error_kind=record.error_kind, downgrade=is_downgrade(record),
        )  # fmt: skip
        if self.recorder is not None:
            self.recorder.event(event)


def is_downgrade(record: DeploymentRecord) -> bool:
    """Was the device directed to an older version than it ran (a rollback by the director, allowed
    above the release floor: reported as such so that the server's history says so)?"""
    return record.previous_version is not None and record.version < record.previous_version


def _open_telemetry(config: AgentConfig, files: StateFiles) -> Any:
    """The telemetry recorder on ``<state_dir>/telemetry.db`` (None if it cannot be opened here).

    A damaged database is set aside (with its WAL) and a fresh one is started: what it held is lost,
    but telemetry goes on and the server is told. Only an unwritable state dir turns telemetry off.
    """
    import sqlite3

    from device_agent.telemetry.buffer import TelemetryBuffer
    from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings

    settings = parse(TelemetrySettings, dict(config.telemetry), "telemetry")  # agent.toml's [telemetry]
    path = config.state_dir / "telemetry.db"
    for attempt in range(2):
        try:
            recorder = TelemetryRecorder(TelemetryBuffer(path, settings.buffer_cap_bytes), settings)
            if recorder.recovered:
                log.info("telemetry: %d window(s) of an earlier run recovered from checkpoints", recorder.recovered)
            return recorder.start()
        except sqlite3.DatabaseError as e:
            if attempt or files.read_only:
                log.warning("telemetry disabled: %s", e)
                return None
            for sidecar in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                sidecar.unlink(missing_ok=True)
            files.quarantine(path, f"not a usable SQLite database: {e}", "started an empty telemetry buffer")
        except Exception as e:  # a read-only state dir in an app process: serve without telemetry
            log.warning("telemetry disabled: %s", e)
            return None
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
        self.capabilities = capabilities or device_capabilities(config)
        self.follow_pointers = follow_pointers
        self.files = updater.files
        self.enrollment: Enrollment | None = None
        """The stored enrollment: the fleet's endpoint and this device's token for the cloud fallback."""
        self.fallback_section: FallbackSection | None = None
        """The desired state's ``fallback`` the pipeline follows now (the daemon and app processes alike)."""
        self._desired_stamp = 0
        self.last_round_at: float | None = None
        """When the daemon last began an update round (None: no round yet, or not a daemon)."""
        self.started_at = time.time()
        self._pointer_stamp: dict[str, int] = {}
        self._known: list[str] = []
        self._known_at = -1e9
        self._checked_at = 0.0

    @classmethod
    def from_config(
        cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Agent:
        """Build an agent from the TOML file and environment (see :func:`device_agent.config.load_config`)."""
        return cls.build(load_config(path, environ, **overrides))

    @classmethod
    def build(
        cls, config: AgentConfig, follow_pointers: bool = True, telemetry: bool = True, read_only: bool = False
    ) -> Agent:
        """Assemble engine, pipeline and updater for ``config``, serving the committed models.

        ``read_only`` (``edgefleet-agent status`` without a daemon): damaged files are worked around
        in memory and reported, but nothing on disk is moved or rewritten.
        """
        config.ensure_state_dir()
        files = StateFiles(config.state_dir, read_only=read_only)
        caps = device_capabilities(config)
        engine = LocalEngine(config.threads, config.max_concurrency, config.max_waiting, config.queue_timeout_s, caps)
        recorder = _open_telemetry(config, files) if telemetry else None
        if recorder is not None:
            files.on_repair(lambda repair: recorder.event(repair.event()))
        updater = Updater(config, engine, lambda: caps, TelemetryReporter(recorder), files=files)
        desired = updater.saved_desired()
        fallback = None if desired is None else desired.fallback
        enrollment = Enrollment.load(config.identity_dir, files)
        pipeline = ServingPipeline(engine, serving_config(config, fallback, enrollment), recorder=recorder)
        agent = cls(config, engine, pipeline, updater, recorder, caps, follow_pointers)
        agent.fallback_section = fallback
        agent.enrollment = enrollment
        if follow_pointers:
            agent.reload_committed()
        return agent

    # --- predictions ------------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any], model: str | None = None, version: int | None = None) -> PredictResult:
        """One prediction: ``inputs`` maps input names to arrays (batch first).

        ``version`` is the version the answer must come from when the fallback chain answers (the
        cloud is asked for it; the previous version does not answer); the local path serves what it
        serves (the HTTP API's ``/versions/{v}/`` refuses any other version first).

        Raises:
            InputError: the inputs do not fit the model.
            ModelNotReadyError: no such model, and no fallback could answer.
            BusyError / InferenceError: the device is saturated or the whole chain failed.
        """
        name = self._model_name(model)
        return self.pipeline.predict(name, _as_arrays(inputs), version)

    def predict_batch(self, batch: Sequence[Mapping[str, Any]], model: str | None = None) -> list[PredictResult]:
        """Several predictions on the same model, each with its own provenance."""
        name = self._model_name(model)
        return self.pipeline.predict_batch(name, [_as_arrays(inputs) for inputs in batch])

    def predict_together(
        self, batch: Sequence[Mapping[str, Any]], model: str | None = None, inputs_private: bool = False
    ) -> list[PredictResult] | None:
        """Local answers to several requests from one model call, or None when each must be predicted alone
        (see ``ServingPipeline.predict_together``; the HTTP API batches concurrent requests through it)."""
        name = self._model_name(model)
        return self.pipeline.predict_together(name, [_as_arrays(inputs) for inputs in batch], inputs_private)

    def await_start_up(self) -> None:
        """Before answering: let start-up finish verifying and loading the installed slots (at most
        ``startup_wait_s``), so that a request that comes meanwhile is answered by the slot that verifies
        rather than by the fallback chain (a 503 "not_ready" when the cloud cannot answer). Free once started.
        """
        if self.updater.starting and not self.updater.wait_recovered(self.config.startup_wait_s):
            log.warning("start-up is still verifying the installed bundles after %.0f s", self.config.startup_wait_s)

    def _model_name(self, model: str | None) -> str:
        if self.updater.starting:
            self.await_start_up()
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
        """Serve the committed slot of every model, verified (what an app process should run)."""
        for name in self.updater.slots.models():
            self._pointer_stamp[name] = _stamp(self.updater.slots.model(name).pointer_path)
            self.updater.serve_committed(name)
        self.updater.mark_recovered()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        stamps = {name: _stamp(self.updater.slots.model(name).pointer_path) for name in self.updater.slots.models()}
        if stamps != self._pointer_stamp:
            self.reload_committed()
        desired_stamp = _stamp(self.config.state_dir / "desired.json")
        if desired_stamp != self._desired_stamp:  # the daemon saved a new desired state: same fallback here
            self._desired_stamp = desired_stamp
            desired = self.updater.saved_desired()
            self.follow_fallback(None if desired is None else desired.fallback)

    def follow_fallback(self, section: FallbackSection | Mapping[str, Any] | None) -> None:
        """Serve with the desired state's fallback ``section`` (and agent.toml's ``[serving]``), if it changed."""
        wanted: FallbackSection | None = (
            section if section is None or isinstance(section, FallbackSection) else parse(FallbackSection, section)
        )
        if wanted == self.fallback_section:
            return
        old = self.pipeline
        config = serving_config(self.config, wanted, self.enrollment)
        self.pipeline = ServingPipeline(self.engine, config, old.recorder)
        self.pipeline.take_shadows(old)
        self.fallback_section = wanted
        old.close()

    # --- status -------------------------------------------------------------------------------------

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Per model this device should answer: served locally or not, and why not."""
        problems = self.updater.problems
        if not self.updater.recovered:
            problems = dict.fromkeys(self.updater.known_models(), "starting: verifying the installed bundles")
        ready = {name: self.engine.ready(name) for name in self.updater.known_models()}
        return {
            name: {"ready": ok, "problem": None if ok else problems.get(name, "not installed yet")}
            for name, ok in ready.items()
        }

    def known_models(self) -> list[str]:
        """The models this device answers for (installed, served, or named by its desired state).

        The part read from disk is cached for a second: this runs on every HTTP request.
        """
        now = time.monotonic()
        if now - self._known_at > 1.0:
            self._known, self._known_at = self.updater.known_models(), now
        served = self.engine.models()
        return self._known if all(name in self._known for name in served) else sorted({*self._known, *served})

    def expected_version(self, model: str) -> int | None:
        """The version of ``model`` this device should serve when nothing local serves it (desired state)."""
        desired = self.updater.saved_desired()
        versions = [m.version for m in ([] if desired is None else desired.models) if m.name == model]
        return versions[0] if versions else None

    def health(self) -> str:
        """``ok`` (every model served locally), ``degraded`` (some only through the fallback chain) or ``no-model``."""
        models = self.readiness()
        if not any(m["ready"] for m in models.values()):
            return "no-model"
        return "ok" if all(m["ready"] for m in models.values()) else "degraded"

    def status(self) -> dict[str, Any]:
        """Active and previous bundle per model, last update result, health, repairs and queue."""
        enrollment = Enrollment.load(self.config.identity_dir, self.files)
        in_progress = self.updater.in_progress()
        engine = self.engine.describe()
        models: dict[str, dict[str, Any]] = {name: {"slots": [], **state} for name, state in self.readiness().items()}
        for line in self.updater.installed():
            models.setdefault(line["name"], {"slots": [], "ready": False, "problem": None})["slots"].append(line)
        for name, served in engine["models"].items():
            models.setdefault(name, {"slots": [], "ready": True, "problem": None})["served"] = served
        return {
            "agent_version": AGENT_VERSION,
            "device_id": None if enrollment is None else enrollment.device_id,
            "server_url": None if enrollment is None else enrollment.server_url,
            "enrollment_status": None if enrollment is None else enrollment.status,
            "models": models,
            "last_update": self.updater.last_result(),
            "update_in_progress": None if in_progress is None else in_progress.value,
            "failed_targets": self.updater.failed.all(),
            "health": self.health(),
            "last_round_at": self.last_round_at,
            "repairs": [dataclasses.asdict(r) for r in self.files.repairs],
            "queue": engine["queue"],
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def inventory(self) -> dict[str, Any]:
        """What the server's inventory endpoint takes."""
        caps = device_capabilities(self.config)
        return {"capabilities": caps.to_dict(), "installed": self.updater.installed(), "agent_version": AGENT_VERSION}

    def close(self) -> None:
        """Flush telemetry and release the models."""
        if self.recorder is not None:
            try:
                self.recorder.stop()
                self.recorder.flush()
            except Exception as e:  # closing must not fail the caller
                log.warning("telemetry flush at close failed: %s", e)
        self.pipeline.close()
        self.engine.close()


def serving_config(
    config: AgentConfig, fallback: FallbackSection | None, enrollment: EnrollmentRecord | None = None
) -> ServingConfig:
    """The serving policy: defaults, then the desired state's cloud fallback, then agent.toml's ``[serving]``.

    The same function builds the daemon's pipeline and an app's (``Agent.from_config``), so both
    answer and fall back alike. An operator's ``[serving] cloud_url`` wins over the fleet's. The fleet
    server announces its inference endpoint in every desired state (``fallback.url``); only a device of
    an older server, whose desired state names none, guesses ``<server_url>/v2`` of its enrollment. The
    device's access token goes only to the fleet's endpoint (the announced one or that guess), never to
    a URL set in agent.toml (which may set ``cloud_token``).
    """
    values: dict[str, Any] = {}
    token = None if enrollment is None else enrollment.access_token
    if fallback is not None and fallback.url:
        mapping = {fallback.model: fallback.model} if fallback.model else dict(fallback.models)
        values.update(cloud_url=fallback.url, cloud_model=mapping, cloud_token=token)
    elif enrollment is not None:
        values.update(cloud_url=enrollment.server_url.rstrip("/") + "/v2", cloud_token=token)
    if "cloud_url" in config.serving and config.serving["cloud_url"] != values.get("cloud_url"):
        values.pop("cloud_token", None)
    values.update(config.serving)
    parsed: ServingConfig = parse(ServingConfig, values, "serving")
    return parsed


def _bounded_health(health: Mapping[str, Any]) -> dict[str, Any]:
    """The health figures as the contract takes them (plain JSON numbers and short strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        return value if isinstance(value, (int, bool, type(None))) else str(value)[:500]

    return {str(k): plain(v) for k, v in list(health.items())[:50]}


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
