"""The serving pipeline: every prediction the agent answers goes through here.

Flow of one request (:meth:`ServingPipeline.predict`):

1. the local engine answers, within the bundle's ``runtime_config.deadline_ms`` when it declares one;
2. the local answer is *not used* when no local model is ready (``not_ready``: first boot,
   mid-install), the local call fails (``local_error``), it misses its deadline (``deadline``), or its
   top-1 probability is under ``runtime_config.confidence_threshold`` (``low_confidence``);
3. then the fallback chain answers, first that succeeds: the cloud endpoint (Open Inference Protocol
   v2, skipped while its circuit breaker is open), the local answer itself for ``low_confidence``
   (better than anything below), the previous local version, a cached result for an identical input
   (deterministic bundles only), the bundle's static answer; else an :class:`InferenceError` that
   names every step that failed.

The answer is a :class:`PredictResult` that says where it came from (``source``) and why the local
model did not answer (``fallback_reason``). A recorder (``device_agent.telemetry``) sees every
answer and every failure. The decision itself (everything but the inference calls) costs a few
microseconds; ``benchmarks/telemetry_overhead.py`` measures it.

The agent builds one pipeline at start-up and calls it from its Python API and its localhost
server; it never calls the local engine directly for a user request.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bundles.errors import EdgeFleetError, InferenceError, InputError, ModelNotReadyError, TransportError
from bundles.manifest import Manifest
from device_agent.fallback import (
    CircuitBreaker,
    OipClient,
    ResultCache,
    confidence_of,
    input_key,
    static_outputs,
)

SOURCES = ("local", "cloud", "previous", "cache", "static")
"""Where an answer came from (persisted strings, stable)."""
FALLBACK_REASONS = ("not_ready", "local_error", "deadline", "low_confidence")
"""Why the local model's answer was not used (persisted strings, stable)."""


class LocalEngine(Protocol):
    """The agent's local inference engine, as the pipeline uses it.

    ``predict`` returns a ``bundles.predictor.Prediction`` (``.outputs`` post-processed, ``.raw``
    model outputs); ``previous_predictor`` the previous version's ``Predictor`` (with ``.manifest``
    and ``.predict(inputs)``), if one is still loaded.
    """

    def ready(self, model: str) -> bool: ...

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any: ...

    def active_manifest(self, model: str) -> Manifest | None: ...

    def previous_predictor(self, model: str) -> Any: ...


class Recorder(Protocol):
    """Sees every answer (``device_agent.telemetry.recorder.TelemetryRecorder``). Runs on the request path."""

    def record(
        self,
        model: str,
        manifest: Manifest | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        source: str | None,
        latency_ms: float,
        fallback_reason: str | None = None,
        error: str | None = None,
        confidence: float | None = None,
        low_confidence: bool = False,
    ) -> None: ...


class CloudClient(Protocol):
    """A cloud endpoint (``device_agent.fallback.OipClient``)."""

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class PredictResult:
    """One answer and its provenance.

    ``source`` is one of :data:`SOURCES`; ``version`` is the bundle version that produced it (None
    for the cloud and for a static answer without a manifest); ``fallback_reason`` says why the local
    model's answer was not used (None when it was).
    """

    outputs: dict[str, np.ndarray]
    source: str
    model: str
    version: int | None
    latency_ms: float
    fallback_reason: str | None = None
    confidence: float | None = None
    raw: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tensors as nested lists) for the localhost API and logs."""
        return {
            "outputs": {k: np.asarray(v).tolist() for k, v in self.outputs.items()},
            "source": self.source,
            "model": self.model,
            "version": self.version,
            "latency_ms": self.latency_ms,
            "fallback_reason": self.fallback_reason,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class ServingConfig:
    """Fallback settings; :meth:`from_dict` reads the ``fallback`` section of the desired state.

    ``cloud_url`` is the OIP v2 base URL (``https://host/v2``); ``cloud_model`` maps a local model
    name to the cloud's name when they differ. ``deadline_ms`` applies to bundles that declare none.
    """

    cloud_url: str | None = None
    cloud_model: dict[str, str] = field(default_factory=dict)
    cloud_timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    cache_entries: int = 256
    cache_max_input_bytes: int = 64 * 1024
    fallback_on_low_confidence: bool = True
    deadline_ms: float | None = None
    deadline_workers: int = 4
    enforce_deadlines: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, **overrides: Any) -> ServingConfig:
        """From the desired state's ``fallback`` object (``{"url", "model"}``) or None (no cloud)."""
        if not data:
            return cls(**overrides)
        model = data.get("model")
        mapping = {str(model): str(model)} if isinstance(model, str) else dict(data.get("models") or {})
        return cls(cloud_url=data.get("url"), cloud_model=mapping, **overrides)


@dataclass(frozen=True)
class _Policy:
    """The per-bundle decisions, compiled once per (model, version)."""

    deadline_s: float | None
    confidence_threshold: float | None
    cacheable: bool
    postprocess: Any  # bundles.processing.Pipeline or None
    raw_names: frozenset[str]


class _DeadlineMissed(Exception):
    pass


@dataclass
class _Attempt:
    """What happened on the way down the chain (for the error message and the sample)."""

    reason: str
    prediction: Any = None
    confidence: float | None = None
    error: str | None = None
    failures: list[str] = field(default_factory=list)


class ServingPipeline:
    """Answers predictions locally and falls back along the chain when it must (module docstring)."""

    def __init__(
        self,
        local: LocalEngine,
        config: ServingConfig | None = None,
        recorder: Recorder | None = None,
        cloud: CloudClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.clock = clock
        self.config = config or ServingConfig()
        self.recorder = recorder
        self.cloud: CloudClient | None = cloud
        if cloud is None and self.config.cloud_url:
            self.cloud = OipClient(self.config.cloud_url, self.config.cloud_timeout_s)
        self.cache = ResultCache(self.config.cache_entries)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._policies: dict[tuple[str, int], _Policy] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # --- public ---------------------------------------------------------------------------------

    def predict(self, model: str, inputs: dict[str, np.ndarray]) -> PredictResult:
        """One prediction with its provenance; :class:`InferenceError` when the whole chain fails."""
        start = time.perf_counter()
        manifest = self.local.active_manifest(model)
        policy = self._policy(model, manifest)
        key = input_key(inputs) if policy.cacheable and _nbytes(inputs) <= self.config.cache_max_input_bytes else None
        attempt = _Attempt("")
        try:
            attempt = self._try_local(model, inputs, policy)
            if attempt.reason == "":
                result = self._local_result(model, manifest, attempt, start)
                if key is not None and manifest is not None:
                    self.cache.put(model, manifest.version, key, result.outputs)
            else:
                result = self._fall_back(model, inputs, manifest, policy, attempt, key, start)
        except InferenceError as e:
            self._record_failure(model, manifest, inputs, start, e, attempt.reason or None)
            raise
        self._record(model, manifest, inputs, result, attempt)
        return result

    def predict_batch(self, model: str, batch: Sequence[dict[str, np.ndarray]]) -> list[PredictResult]:
        """Several predictions, each with its own provenance."""
        return [self.predict(model, inputs) for inputs in batch]

    def breaker(self, model: str) -> CircuitBreaker:
        """The cloud circuit breaker of ``model`` (one per model, so one bad model does not close all)."""
        found = self._breakers.get(model)
        if found is None:
            found = self._breakers[model] = CircuitBreaker(
                self.config.breaker_failures, self.config.breaker_reset_s, self.clock, self._breaker_hook(model)
            )
        return found

    def close(self) -> None:
        """Release the deadline threads and the cloud client."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.cloud, "close", None)
        if callable(close):
            close()

    # --- local ----------------------------------------------------------------------------------

    def _policy(self, model: str, manifest: Manifest | None) -> _Policy:
        version = manifest.version if manifest is not None else 0
        found = self._policies.get((model, version))
        if found is None:
            found = self._policies[(model, version)] = self._compile_policy(manifest)
        return found

    def _compile_policy(self, manifest: Manifest | None) -> _Policy:
        if manifest is None:
            deadline_ms = self.config.deadline_ms if self.config.enforce_deadlines else None
            return _Policy(None if deadline_ms is None else deadline_ms / 1000.0, None, False, None, frozenset())
        rc = manifest.runtime_config
        deadline_ms = rc.deadline_ms if rc.deadline_ms is not None else self.config.deadline_ms
        if not self.config.enforce_deadlines:
            deadline_ms = None
        return _Policy(
            deadline_s=None if deadline_ms is None else deadline_ms / 1000.0,
            confidence_threshold=rc.confidence_threshold if self.config.fallback_on_low_confidence else None,
            cacheable=rc.deterministic and self.config.cache_entries > 0,
            postprocess=_compile_postprocess(manifest),
            raw_names=frozenset(t.name for t in manifest.outputs),
        )

    def _try_local(self, model: str, inputs: dict[str, np.ndarray], policy: _Policy) -> _Attempt:
        """The local answer, or why there is none (``reason`` empty when the local answer stands)."""
        if not self.local.ready(model):
            return _Attempt("not_ready")
        try:
            prediction = self._run_local(model, inputs, policy.deadline_s)
        except _DeadlineMissed:
            return _Attempt("deadline", error=f"local inference exceeded {policy.deadline_s} s")
        except InputError:
            raise
        except ModelNotReadyError as e:
            return _Attempt("not_ready", error=str(e))
        except Exception as e:  # noqa: BLE001 - any local failure is a reason to fall back
            return _Attempt("local_error", error=f"{type(e).__name__}: {e}")
        threshold = policy.confidence_threshold
        if threshold is None:
            return _Attempt("", prediction)
        confidence = confidence_of(prediction.raw, prediction.outputs)
        if confidence is not None and confidence < threshold:
            return _Attempt("low_confidence", prediction, confidence)
        return _Attempt("", prediction, confidence)

    def _run_local(self, model: str, inputs: dict[str, np.ndarray], deadline_s: float | None) -> Any:
        if deadline_s is None:
            return self.local.predict(model, inputs, timeout_s=None)
        if self._executor is None:
            with self._executor_lock:
                if self._executor is None:
                    workers = self.config.deadline_workers
                    self._executor = concurrent.futures.ThreadPoolExecutor(workers, "edgefleet-local")
        future = self._executor.submit(self.local.predict, model, inputs, deadline_s)
        try:
            return future.result(timeout=deadline_s)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            raise _DeadlineMissed() from e

    def _local_result(self, model: str, manifest: Manifest | None, attempt: _Attempt, start: float) -> PredictResult:
        prediction = attempt.prediction
        return PredictResult(
            outputs=dict(prediction.outputs),
            source="local",
            model=model,
            version=None if manifest is None else manifest.version,
            latency_ms=_elapsed_ms(start),
            fallback_reason=attempt.reason or None,
            confidence=attempt.confidence,
            raw=dict(getattr(prediction, "raw", None) or {}),
        )

    # --- the chain ------------------------------------------------------------------------------

    def _fall_back(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        manifest: Manifest | None,
        policy: _Policy,
        attempt: _Attempt,
        key: bytes | None,
        start: float,
    ) -> PredictResult:
        def answer(outputs: dict[str, np.ndarray], source: str, version: int | None) -> PredictResult:
            return PredictResult(
                dict(outputs), source, model, version, _elapsed_ms(start), attempt.reason, attempt.confidence
            )

        cloud = self._try_cloud(model, inputs, policy, attempt)
        if cloud is not None:
            return answer(cloud, "cloud", None)
        if attempt.reason == "low_confidence" and attempt.prediction is not None:
            return self._local_result(model, manifest, attempt, start)
        previous = self._try_previous(model, inputs, attempt)
        if previous is not None:
            return answer(*previous)
        if key is not None and manifest is not None:
            cached = self.cache.get(model, manifest.version, key)
            if cached is not None:
                return answer(cached, "cache", manifest.version)
            attempt.failures.append("cache: no cached answer for this input")
        static = static_outputs(manifest)
        if static is not None:
            return answer(static, "static", None if manifest is None else manifest.version)
        attempt.failures.append("static: the bundle declares no static answer")
        raise InferenceError(_no_answer_message(model, attempt))

    def _try_cloud(
        self, model: str, inputs: dict[str, np.ndarray], policy: _Policy, attempt: _Attempt
    ) -> dict[str, np.ndarray] | None:
        if self.cloud is None:
            attempt.failures.append("cloud: no fallback endpoint configured")
            return None
        breaker = self.breaker(model)
        if not breaker.allow():
            attempt.failures.append("cloud: circuit breaker open")
            return None
        try:
            outputs = self.cloud.infer(self.config.cloud_model.get(model, model), inputs)
        except TransportError as e:
            breaker.failure()
            attempt.failures.append(f"cloud: {e}")
            return None
        except EdgeFleetError as e:
            breaker.success()  # the cloud is alive; it refused this request
            attempt.failures.append(f"cloud: {e}")
            return None
        breaker.success()
        return _postprocessed(outputs, policy)

    def _try_previous(
        self, model: str, inputs: dict[str, np.ndarray], attempt: _Attempt
    ) -> tuple[dict[str, np.ndarray], str, int | None] | None:
        try:
            predictor = self.local.previous_predictor(model)
        except EdgeFleetError as e:
            attempt.failures.append(f"previous: {e}")
            return None
        if predictor is None:
            attempt.failures.append("previous: no previous version loaded")
            return None
        try:
            prediction = predictor.predict(inputs)
        except Exception as e:  # noqa: BLE001 - the chain goes on whatever the previous version raised
            attempt.failures.append(f"previous: {type(e).__name__}: {e}")
            return None
        previous_manifest = getattr(predictor, "manifest", None)
        return dict(prediction.outputs), "previous", getattr(previous_manifest, "version", None)

    # --- telemetry ------------------------------------------------------------------------------

    def _record(
        self,
        model: str,
        manifest: Manifest | None,
        inputs: dict[str, np.ndarray],
        result: PredictResult,
        attempt: _Attempt,
    ) -> None:
        if self.recorder is None:
            return
        self.recorder.record(
            model, manifest, inputs, result.outputs, result.source, result.latency_ms, result.fallback_reason,
            attempt.error, result.confidence, attempt.reason == "low_confidence",
        )  # fmt: skip

    def _record_failure(
        self,
        model: str,
        manifest: Manifest | None,
        inputs: dict[str, np.ndarray],
        start: float,
        error: Exception,
        reason: str | None,
    ) -> None:
        if self.recorder is not None:
            self.recorder.record(model, manifest, inputs, None, None, _elapsed_ms(start), reason, str(error)[:500])

    def _breaker_hook(self, model: str) -> Any:
        recorder = self.recorder
        hook = getattr(recorder, "breaker_changed", None)
        if not callable(hook):
            return None
        return lambda state, failures: hook(model, state, failures)


def _compile_postprocess(manifest: Manifest) -> Any:
    """The manifest's post-processing, compiled once, to give cloud answers the local answer's shape."""
    if not manifest.postprocess:
        return None
    from bundles.processing import compile_steps

    return compile_steps(manifest.postprocess, "post", manifest.outputs[0].name)


def _postprocessed(outputs: dict[str, np.ndarray], policy: _Policy) -> dict[str, np.ndarray]:
    """Apply the bundle's post-processing when the cloud answered the raw model outputs."""
    if policy.postprocess is None or not policy.raw_names <= set(outputs):
        return outputs
    try:
        return dict(policy.postprocess(outputs))
    except InferenceError:
        return outputs


def _no_answer_message(model: str, attempt: _Attempt) -> str:
    local = attempt.reason + (f" ({attempt.error})" if attempt.error else "")
    return f"no answer for model '{model}': local model {local}; " + "; ".join(attempt.failures)


def _nbytes(inputs: Mapping[str, Any]) -> int:
    return sum(int(getattr(value, "nbytes", 0)) for value in inputs.values())


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
