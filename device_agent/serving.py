"""The serving pipeline: every prediction the agent answers goes through here.

Flow of one request (:meth:`ServingPipeline.predict`):

1. the local engine answers, within the bundle's ``runtime_config.deadline_ms`` when it declares one:
   raced on a worker thread, or inline while the model's recent p99 latency is far below the deadline
   (:class:`DeadlineGuard`: a late inline answer is kept but counted as a ``deadline`` miss, and the
   model goes back to the worker thread for a while);
2. the local answer is *not used* when no local model is ready (``not_ready``: first boot,
   mid-install), the local call fails (``local_error``), it misses its deadline (``deadline``), or its
   top-1 probability is under ``runtime_config.confidence_threshold`` (``low_confidence``);
3. then the fallback chain answers, first that succeeds: the cloud endpoint (Open Inference Protocol
   v2, skipped while its circuit breaker is open), the local answer itself for ``low_confidence``
   (better than anything below), the previous local version, a cached result for an identical input
   (deterministic bundles only), the bundle's static answer; else an :class:`InferenceError` that
   names every step that failed.

The answer is a :class:`PredictResult` that says where it came from (``source``) and why the local
model did not answer (``fallback_reason``). A local answer is remembered by the result cache (keyed
only when the cache is read) and, when the model has a shadow (``device_agent.shadow``), offered to
it on a background thread. A recorder (``device_agent.telemetry``) sees every answer and every
failure; the cache keeps a private copy of a single-array input, and the recorder's routine path
reads the answer before returning (it keeps bytes, not the caller's arrays).
The decision itself (everything but the inference calls) costs a few microseconds;
``benchmarks/telemetry_overhead.py`` measures it.

The agent builds one pipeline at start-up and calls it from its Python API and its localhost
server; it never calls the local engine directly for a user request.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bundles.errors import EdgeFleetError, InferenceError, InputError, ModelNotReadyError, TransportError
from bundles.manifest import Manifest
from bundles.tensors import conform_inputs, input_dtypes
from device_agent.fallback import (
    CircuitBreaker,
    CloudAnswer,
    OipClient,
    ResultCache,
    cache_key,
    confidence_of,
    static_outputs,
)

SOURCES = ("local", "cloud", "previous", "cache", "static")
"""Where an answer came from (persisted strings, stable)."""
FALLBACK_REASONS = ("not_ready", "local_error", "deadline", "low_confidence")
"""Why the local model's answer was not used (persisted strings, stable)."""


class LocalEngine(Protocol):
    """The agent's local inference engine, as the pipeline uses it.

    ``predict`` returns a ``bundles.predictor.Prediction`` (``.outputs`` post-processed, ``.raw``
    model outputs), ``predict_batch`` one per request, from one model call where it can;
    ``previous_predictor`` the previous version's ``Predictor`` (with ``.manifest`` and
    ``.predict(inputs)``), if one is still loaded.
    """

    def ready(self, model: str) -> bool: ...

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any: ...

    def predict_batch(self, model: str, batch: list[dict[str, np.ndarray]]) -> list[Any]: ...

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
        inputs_private: bool = False,
    ) -> None: ...

    # Optional: ``record_local(model, manifest, inputs, outputs, latency_ms, confidence)``, the same as ``record`` for a
    # routine answer (local, no fallback; reads ``inputs`` before returning), used when the recorder has it.


class CloudClient(Protocol):
    """A cloud endpoint (``device_agent.fallback.OipClient``).

    ``infer`` raises :class:`TransportError` when the cloud failed (counted by the breaker),
    :class:`InputError` when it refused the inputs (the client's error), another
    :class:`EdgeFleetError` when it cannot answer this request. Optional:
    ``input_dtypes(model) -> {input name: numpy dtype}``, the cloud's declared inputs, used to
    convert a request when no local model declares them.
    """

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None) -> CloudAnswer: ...


@dataclass(frozen=True)
class PredictResult:
    """One answer and its provenance.

    ``source`` is one of :data:`SOURCES`; ``version`` is the bundle version that produced it (the
    cloud's ``model_version``; None when a cloud does not say, and for a static answer without a
    manifest); ``fallback_reason`` says why the local
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
    name to the cloud's name when they differ; ``cloud_token`` is sent as ``Authorization: Bearer``
    (the device's own access token when the endpoint is the fleet's). ``deadline_ms`` applies to
    bundles that declare none.
    A deadline-bound call runs inline (no worker thread) while the p99 of the model's recent
    latencies times ``inline_deadline_margin`` is within the deadline (0 turns inline runs off); a
    miss sends the model to the worker-thread path for ``inline_cooldown_s`` (see :class:`DeadlineGuard`).
    """

    cloud_url: str | None = None
    cloud_model: dict[str, str] = field(default_factory=dict)
    cloud_token: str | None = None
    cloud_timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    cache_entries: int = 256
    cache_max_input_bytes: int = 64 * 1024
    fallback_on_low_confidence: bool = True
    deadline_ms: float | None = None
    deadline_workers: int = 4
    enforce_deadlines: bool = True
    inline_deadline_margin: float = 10.0
    inline_cooldown_s: float = 60.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, **overrides: Any) -> ServingConfig:
        """From the desired state's ``fallback`` object (``{"url", "model"}``) or None (no cloud)."""
        if not data:
            return cls(**overrides)
        model = data.get("model")
        mapping = {str(model): str(model)} if isinstance(model, str) else dict(data.get("models") or {})
        return cls(cloud_url=data.get("url"), cloud_model=mapping, **overrides)


class DeadlineGuard:
    """Whether a deadline-bound local call may run inline, from the model's recent latencies.

    Racing a call against its deadline needs a worker thread (a hand-off of ~30 µs, more than the
    whole model on small inputs). When the p99 of the last :data:`RING` latencies, times ``margin``,
    is within the deadline, the call runs in the caller's thread instead. The price: an inline call
    that hangs cannot be abandoned, so that one request answers late. A late inline answer is still
    returned (nothing else could be faster by then) but counted as a deadline miss, and the model
    goes back to the worker-thread path (which abandons late calls and falls back) for
    ``cooldown_s``; it returns inline only once fresh latencies are far below the deadline again.
    Updates are plain attribute writes under the GIL: a lost update only delays a decision.
    """

    RING = 64
    DECIDE_EVERY = 16
    MIN_SAMPLES = 32

    def __init__(self, deadline_s: float, margin: float, cooldown_s: float, clock: Callable[[], float]) -> None:
        self.deadline_s, self.margin, self.cooldown_s, self.clock = deadline_s, margin, cooldown_s, clock
        self.ring = [0.0] * self.RING
        self.count = 0
        self.inline = False
        self.misses = 0
        self.thread_until = 0.0

    def observe(self, elapsed_s: float) -> None:
        """Note the latency of a call that met its deadline; re-decide every few calls."""
        count = self.count
        self.ring[count % self.RING] = elapsed_s
        self.count = count + 1
        if self.count % self.DECIDE_EVERY == 0:
            self.inline = self._inline_allowed()

    def missed(self) -> None:
        """A call missed the deadline: worker-thread path for ``cooldown_s``, history forgotten."""
        self.misses += 1
        self.inline = False
        self.count = 0
        self.thread_until = self.clock() + self.cooldown_s

    def p99_s(self) -> float | None:
        filled = min(self.count, self.RING)
        if filled == 0:
            return None
        ordered = sorted(self.ring[:filled])
        return ordered[min(filled - 1, int(0.99 * filled))]

    def _inline_allowed(self) -> bool:
        p99 = self.p99_s()
        if self.margin <= 0 or p99 is None or self.count < self.MIN_SAMPLES or self.clock() < self.thread_until:
            return False
        return p99 * self.margin <= self.deadline_s


@dataclass(frozen=True)
class _Policy:
    """The per-bundle decisions, compiled once per (model, version)."""

    deadline_s: float | None
    confidence_threshold: float | None
    cacheable: bool
    postprocess: Any  # bundles.processing.Pipeline or None
    raw_names: frozenset[str]
    guard: DeadlineGuard | None = None
    input_dtypes: Mapping[str, np.dtype[Any]] = field(default_factory=dict)
    """What the fallback converts inputs to before forwarding them ({}: no local manifest, ask the cloud)."""


class _DeadlineMissed(Exception):
    pass


class _LateAnswer(Exception):
    """An inline call answered after its deadline (the answer is kept)."""

    def __init__(self, prediction: Any) -> None:
        super().__init__("late")
        self.prediction = prediction


class _Attempt:
    """What happened on the way down the chain (for the error message and the sample).

    ``late`` marks a local answer that came after the deadline and is used anyway (inline runs).
    A plain class with slots: one is built per request.
    """

    __slots__ = ("reason", "prediction", "confidence", "error", "failures", "late")

    def __init__(
        self, reason: str, prediction: Any = None, confidence: float | None = None, error: str | None = None
    ) -> None:
        self.reason, self.prediction, self.confidence, self.error = reason, prediction, confidence, error
        self.failures: list[str] = []
        self.late = False


class _Shadow:
    """A shadow predictor and its run gate (one run at a time; skipped, not queued, while busy)."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.gate = threading.Semaphore(1)
        self.retired = False
        self.compared = self.agreed = self.errors = self.skipped = 0

    def count(self, agreed: bool, failed: bool) -> None:
        self.compared += 1
        self.agreed += int(agreed)
        self.errors += int(failed)

    def finish(self) -> None:
        self.gate.release()
        if self.retired and self.gate.acquire(blocking=False):
            self.predictor.close()  # retired while running: the last run closes it

    def retire(self) -> None:
        self.retired = True
        if self.gate.acquire(blocking=False):
            self.predictor.close()


_NO_ATTEMPT = _Attempt("")
"""Stands for "no local attempt yet" if the chain fails before one (never mutated)."""


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
            token = self.config.cloud_token
            headers = {"Authorization": f"Bearer {token}"} if token else None
            self.cloud = OipClient(self.config.cloud_url, self.config.cloud_timeout_s, headers=headers)
        self.cache = ResultCache(self.config.cache_entries)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._policies: dict[tuple[str, int], _Policy] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._shadows: dict[str, _Shadow] = {}
        self._shadow_executor: concurrent.futures.ThreadPoolExecutor | None = None

    # --- public ---------------------------------------------------------------------------------

    @property
    def recorder(self) -> Recorder | None:
        return self._recorder

    @recorder.setter
    def recorder(self, value: Recorder | None) -> None:
        """Also binds the recorder's optional ``record_local`` fast path (read on every request)."""
        self._recorder = value
        self._record_local: Callable[..., None] | None = getattr(value, "record_local", None)

    def predict(self, model: str, inputs: dict[str, np.ndarray], version: int | None = None) -> PredictResult:
        """One prediction with its provenance; :class:`InferenceError` when the whole chain fails.

        ``version``: the version the caller asked for (the HTTP API's ``/versions/{v}/``, which serves it
        locally or 404s): the cloud is asked for that version, and the previous version does not answer.
        """
        start = time.perf_counter()
        manifest = self.local.active_manifest(model)
        policy = self._policy(model, manifest)
        attempt = _NO_ATTEMPT
        private: dict[str, np.ndarray] | None = None
        try:
            attempt = self._try_local(model, inputs, policy)
            if attempt.reason == "" or attempt.late:
                result = self._local_result(model, manifest, attempt, start)
                if policy.cacheable:
                    private = _private_copy(inputs)  # the cache keeps it; telemetry reads inputs before returning
                if policy.cacheable and manifest is not None:
                    self.cache.remember(
                        model, manifest.version, private or inputs, result.outputs, self.config.cache_max_input_bytes,
                        copied=private is not None,
                    )  # fmt: skip
                if self._shadows:
                    self._offer_shadow(model, inputs, result.outputs)
            else:
                key = cache_key(inputs, self.config.cache_max_input_bytes) if policy.cacheable else None
                result = self._fall_back(model, inputs, manifest, policy, attempt, key, start, version)
        except InferenceError as e:
            self._record_failure(model, manifest, inputs, start, e, attempt.reason or None)
            raise
        recorder = self._recorder
        if recorder is None:
            return result
        record_local = self._record_local
        if record_local is not None and attempt.reason == "" and not attempt.late:
            record_local(model, manifest, inputs, result.outputs, result.latency_ms, result.confidence)  # routine
        else:  # inlined (not self._record): one Python call less per request
            recorder.record(
                model, manifest, private or inputs, result.outputs, result.source, result.latency_ms,
                result.fallback_reason, attempt.error, result.confidence, attempt.reason == "low_confidence",
                inputs_private=private is not None,
            )  # fmt: skip
        return result

    def predict_batch(self, model: str, batch: Sequence[dict[str, np.ndarray]]) -> list[PredictResult]:
        """Several predictions, each with its own provenance: one model call when they can share it
        (:meth:`predict_together`), else one :meth:`predict` each."""
        together = self.predict_together(model, batch)
        return together if together is not None else [self.predict(model, inputs) for inputs in batch]

    def predict_together(
        self, model: str, batch: Sequence[dict[str, np.ndarray]], inputs_private: bool = False
    ) -> list[PredictResult] | None:
        """Local answers to several requests from one model call (dynamic batching; one call per run of rows
        the model's declared batch range allows), or None when each must be answered alone by :meth:`predict`.

        None when the policy decides per request (a confidence threshold; a deadline while the calls race it on
        the deadline thread), when no local model is ready, when the requests do not stack (input names,
        dtypes, shapes) or the model cannot take them together (a fixed batch dimension, a batch range too
        small), and when the call fails or misses the deadline: each request then meets the fallback chain
        alone, with its own error. A deadline-bound model runs together only while :class:`DeadlineGuard`
        lets it run inline; the guard observes the shared call's latency.

        Each answer is recorded, cached and offered to the shadow as :meth:`predict` does; its latency is the
        shared call's. ``inputs_private``: nobody else holds the arrays (freshly decoded), so the cache keeps
        them without a copy. A row's numbers may differ from a batch-1 call's in the last bits (the runtime
        picks other kernels for a larger batch).
        """
        if len(batch) < 2:
            return None
        manifest = self.local.active_manifest(model)
        policy = self._policy(model, manifest)
        guard = policy.guard
        if manifest is None or policy.confidence_threshold is not None or (guard is not None and not guard.inline):
            return None
        chunks = _row_chunks(batch, _max_batch_rows(manifest))
        if chunks is None or not self.local.ready(model):
            return None
        start = time.perf_counter()
        predictions: list[Any] = []
        try:
            for chunk in chunks:
                predictions += self.local.predict_batch(model, list(chunk))
        except Exception:  # noqa: BLE001 - each request is tried alone: its own error, its own fallback
            return None
        latency_ms = _elapsed_ms(start)
        if guard is not None:
            if latency_ms > guard.deadline_s * 1000.0:
                guard.missed()  # the requests are tried alone, on the deadline thread
                return None
            guard.observe(latency_ms / 1000.0)
        return [self._together_result(model, manifest, policy, inputs, p, latency_ms, inputs_private)
                for inputs, p in zip(batch, predictions, strict=True)]  # fmt: skip

    def _together_result(
        self, model: str, manifest: Manifest, policy: _Policy, inputs: dict[str, np.ndarray], prediction: Any,
        latency_ms: float, inputs_private: bool,
    ) -> PredictResult:  # fmt: skip
        """One request's answer out of a shared call, remembered and recorded as :meth:`predict` does."""
        outputs = prediction.outputs
        raw = getattr(prediction, "raw", None) or {}
        result = PredictResult(outputs, "local", model, manifest.version, latency_ms, None, None,
                               dict(raw) if raw is outputs else raw)  # fmt: skip
        if policy.cacheable:
            private = inputs if inputs_private else _private_copy(inputs)
            self.cache.remember(model, manifest.version, private or inputs, outputs,
                                self.config.cache_max_input_bytes, copied=private is not None)  # fmt: skip
        if self._shadows:
            self._offer_shadow(model, inputs, outputs)
        if self._record_local is not None:
            self._record_local(model, manifest, inputs, outputs, latency_ms, None)
        elif self._recorder is not None:
            self._recorder.record(model, manifest, inputs, outputs, "local", latency_ms, None, None, None, False)
        return result

    def breaker(self, model: str) -> CircuitBreaker:
        """The cloud circuit breaker of ``model`` (one per model, so one bad model does not close all)."""
        found = self._breakers.get(model)
        if found is None:
            found = self._breakers[model] = CircuitBreaker(
                self.config.breaker_failures, self.config.breaker_reset_s, self.clock, self._breaker_hook(model)
            )
        return found

    def close(self) -> None:
        """Release the deadline threads, the shadows and the cloud client."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for model in list(self._shadows):
            self.clear_shadow(model)
        if self._shadow_executor is not None:
            self._shadow_executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.cloud, "close", None)
        if callable(close):
            close()

    # --- shadow mode (device_agent.shadow) ---------------------------------------------------------

    def set_shadow(self, model: str, predictor: Any) -> None:
        """Run ``predictor`` (a loaded ``Predictor``) beside every local answer of ``model`` from now on."""
        old, self._shadows[model] = self._shadows.get(model), _Shadow(predictor)
        if old is not None:
            old.retire()

    def clear_shadow(self, model: str) -> None:
        """Stop the shadow of ``model`` (its runtime is closed once its last run ends)."""
        old = self._shadows.pop(model, None)
        if old is not None:
            old.retire()

    def shadow(self, model: str) -> _Shadow | None:
        return self._shadows.get(model)

    def take_shadows(self, other: ServingPipeline) -> None:
        """Carry ``other``'s shadows over (a pipeline rebuilt for new fallback settings keeps them)."""
        self._shadows, other._shadows = other._shadows, {}

    def _offer_shadow(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Queue one shadow run on a copy of the inputs, unless the previous one is still running."""
        shadow = self._shadows.get(model)
        if shadow is None:
            return
        if not shadow.gate.acquire(blocking=False):
            shadow.skipped += 1
            return
        if self._shadow_executor is None:
            self._shadow_executor = concurrent.futures.ThreadPoolExecutor(1, "edgefleet-shadow")
        copied = {name: np.array(value) for name, value in inputs.items()}
        try:
            self._shadow_executor.submit(self._run_shadow, model, shadow, copied, dict(outputs))
        except RuntimeError:  # the executor is shut down: the pipeline is closing
            shadow.gate.release()

    def _run_shadow(
        self, model: str, shadow: _Shadow, inputs: dict[str, np.ndarray], active: dict[str, np.ndarray]
    ) -> None:
        from device_agent.shadow import top1_agrees

        try:
            if shadow.retired:
                return
            began = time.perf_counter()
            try:
                agreed, failed = top1_agrees(active, shadow.predictor.predict(inputs).outputs), False
            except Exception:  # noqa: BLE001 - a failing shadow is a finding to report, never the caller's error
                agreed, failed = False, True
            latency_ms = _elapsed_ms(began)
            shadow.count(agreed, failed)
            recorder = getattr(self.recorder, "record_shadow", None)
            if callable(recorder):
                recorder(model, shadow.predictor.manifest, agreed, latency_ms=latency_ms, error=failed)
        finally:
            shadow.finish()

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
            deadline_s = None if deadline_ms is None else deadline_ms / 1000.0
            return _Policy(deadline_s, None, False, None, frozenset(), self._guard(deadline_s))
        rc = manifest.runtime_config
        deadline_ms = rc.deadline_ms if rc.deadline_ms is not None else self.config.deadline_ms
        if not self.config.enforce_deadlines:
            deadline_ms = None
        deadline_s = None if deadline_ms is None else deadline_ms / 1000.0
        return _Policy(
            deadline_s=deadline_s,
            confidence_threshold=rc.confidence_threshold if self.config.fallback_on_low_confidence else None,
            cacheable=rc.deterministic and self.config.cache_entries > 0,
            postprocess=_compile_postprocess(manifest),
            raw_names=frozenset(t.name for t in manifest.outputs),
            guard=self._guard(deadline_s),
            input_dtypes=input_dtypes(manifest.inputs),
        )

    def _guard(self, deadline_s: float | None) -> DeadlineGuard | None:
        if deadline_s is None:
            return None
        return DeadlineGuard(deadline_s, self.config.inline_deadline_margin, self.config.inline_cooldown_s, self.clock)

    def deadline_guard(self, model: str) -> DeadlineGuard | None:
        """The inline/worker-thread decision state of the active version of ``model`` (None: no deadline)."""
        return self._policy(model, self.local.active_manifest(model)).guard

    def _try_local(self, model: str, inputs: dict[str, np.ndarray], policy: _Policy) -> _Attempt:
        """The local answer, or why there is none (``reason`` empty when the local answer stands)."""
        if not self.local.ready(model):
            return _Attempt("not_ready")
        try:
            prediction = self._run_local(model, inputs, policy)
        except _DeadlineMissed:
            return _Attempt("deadline", error=f"local inference exceeded {policy.deadline_s} s")
        except _LateAnswer as late:
            attempt = _Attempt(
                "deadline", late.prediction, error=f"local inference (inline) exceeded {policy.deadline_s} s"
            )
            attempt.late = True
            return attempt
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

    def _run_local(self, model: str, inputs: dict[str, np.ndarray], policy: _Policy) -> Any:
        deadline_s, guard = policy.deadline_s, policy.guard
        if deadline_s is None or guard is None:
            return self.local.predict(model, inputs, timeout_s=None)
        began = time.perf_counter()
        if guard.inline:
            prediction = self.local.predict(model, inputs, timeout_s=deadline_s)
            elapsed_s = time.perf_counter() - began
            if elapsed_s > deadline_s:
                guard.missed()
                raise _LateAnswer(prediction)
            guard.observe(elapsed_s)
            return prediction
        prediction = self._run_on_worker(model, inputs, deadline_s, guard)
        guard.observe(time.perf_counter() - began)
        return prediction

    def _run_on_worker(self, model: str, inputs: dict[str, np.ndarray], deadline_s: float, guard: DeadlineGuard) -> Any:
        """Race the local call against the deadline on a worker thread (abandoned if late)."""
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
            guard.missed()
            raise _DeadlineMissed() from e

    def _local_result(self, model: str, manifest: Manifest | None, attempt: _Attempt, start: float) -> PredictResult:
        prediction = attempt.prediction
        outputs = prediction.outputs
        raw = getattr(prediction, "raw", None) or {}
        return PredictResult(
            outputs,
            "local",
            model,
            None if manifest is None else manifest.version,
            _elapsed_ms(start),
            attempt.reason or None,
            attempt.confidence,
            dict(raw) if raw is outputs else raw,  # fresh dicts per call; only split when they are one object
        )

    # --- the chain ------------------------------------------------------------------------------

    def _fall_back(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        manifest: Manifest | None,
        policy: _Policy,
        attempt: _Attempt,
        key: Hashable | None,
        start: float,
        version: int | None = None,
    ) -> PredictResult:
        def answer(outputs: dict[str, np.ndarray], source: str, version: int | None) -> PredictResult:
            return PredictResult(
                dict(outputs), source, model, version, _elapsed_ms(start), attempt.reason, attempt.confidence
            )

        cloud = self._try_cloud(model, inputs, policy, attempt, version)
        if cloud is not None:
            return answer(*cloud)
        if attempt.reason == "low_confidence" and attempt.prediction is not None:
            return self._local_result(model, manifest, attempt, start)
        previous = self._try_previous(model, inputs, attempt, version)
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
        self, model: str, inputs: dict[str, np.ndarray], policy: _Policy, attempt: _Attempt, version: int | None
    ) -> tuple[dict[str, np.ndarray], str, int | None] | None:
        """The cloud's answer (outputs, ``"cloud"``, the version it ran), None to go on down the chain."""
        if self.cloud is None:
            attempt.failures.append("cloud: no fallback endpoint configured")
            return None
        breaker = self.breaker(model)
        if not breaker.allow():
            attempt.failures.append("cloud: circuit breaker open")
            return None
        name = self.config.cloud_model.get(model, model)
        try:
            reply = self.cloud.infer(name, self._as_declared(name, inputs, policy), version)
        except TransportError as e:
            breaker.failure()
            attempt.failures.append(f"cloud: {e}")
            return None
        except InputError as e:  # the inputs cannot be what the model takes: the client's error, as if local
            breaker.success()
            if attempt.reason == "low_confidence":  # the local model took them: its answer follows
                attempt.failures.append(f"cloud: {e}")
                return None
            raise
        except EdgeFleetError as e:
            breaker.success()  # the cloud is alive; it refused this request
            attempt.failures.append(f"cloud: {e}")
            return None
        breaker.success()
        outputs = reply.outputs if reply.postprocessed else _postprocessed(reply.outputs, policy)
        return outputs, "cloud", reply.version

    def _as_declared(self, cloud_model: str, inputs: dict[str, np.ndarray], policy: _Policy) -> dict[str, np.ndarray]:
        """The inputs the local model would run (:func:`bundles.tensors.conform` to its declared dtypes), for the cloud.

        With no local manifest (nothing loaded), the cloud's own model metadata declares the dtypes.
        """
        dtypes = policy.input_dtypes
        if not dtypes:
            declared = getattr(self.cloud, "input_dtypes", None)
            dtypes = declared(cloud_model) if callable(declared) else {}
        return conform_inputs(inputs, dtypes) if dtypes else inputs

    def _try_previous(
        self, model: str, inputs: dict[str, np.ndarray], attempt: _Attempt, version: int | None
    ) -> tuple[dict[str, np.ndarray], str, int | None] | None:
        try:
            predictor = self.local.previous_predictor(model)
        except EdgeFleetError as e:
            attempt.failures.append(f"previous: {e}")
            return None
        if predictor is None:
            attempt.failures.append("previous: no previous version loaded")
            return None
        previous_version = getattr(getattr(predictor, "manifest", None), "version", None)
        if version is not None and previous_version != version:
            attempt.failures.append(f"previous: version {previous_version}, not the version {version} asked for")
            return None
        try:
            prediction = predictor.predict(inputs)
        except Exception as e:  # noqa: BLE001 - the chain goes on whatever the previous version raised
            attempt.failures.append(f"previous: {type(e).__name__}: {e}")
            return None
        return dict(prediction.outputs), "previous", previous_version

    # --- telemetry ------------------------------------------------------------------------------

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
    """Apply the bundle's post-processing when the cloud answered the raw model outputs only (a plain OIP
    server; edgefleet's endpoint says it post-processed them already, and they are not touched again)."""
    if policy.postprocess is None or not policy.raw_names <= set(outputs):
        return outputs
    try:
        return dict(policy.postprocess(outputs))
    except InferenceError:
        return outputs


def _max_batch_rows(manifest: Manifest) -> int | None:
    """The most rows one call of the model takes (None: no declared limit); 1 when its batch is fixed."""
    limit: int | None = None
    for spec in manifest.inputs:
        if not spec.shape or spec.shape[0] != -1:
            return 1
        declared = spec.dim_ranges.get("0")
        if declared is not None:
            limit = declared[1] if limit is None else min(limit, declared[1])
    return limit


def _row_chunks(
    batch: Sequence[dict[str, np.ndarray]], max_rows: int | None
) -> list[Sequence[dict[str, np.ndarray]]] | None:
    """``batch`` cut into runs of at most ``max_rows`` rows, or None when its requests cannot be stacked."""
    first = batch[0]
    names = list(first)
    if not names or max_rows == 1:
        return None
    chunks: list[Sequence[dict[str, np.ndarray]]] = []
    begin, rows = 0, 0
    for index, inputs in enumerate(batch):
        if list(inputs) != names:
            return None
        n = _stackable_rows(inputs, first)
        if n is None or (max_rows is not None and n > max_rows):
            return None
        if max_rows is not None and rows + n > max_rows:
            chunks.append(batch[begin:index])
            begin, rows = index, 0
        rows += n
    chunks.append(batch[begin:])
    return chunks


def _stackable_rows(inputs: Mapping[str, Any], first: Mapping[str, Any]) -> int | None:
    """The rows of one request whose arrays stack onto ``first``'s (same dtype and trailing shape), else None."""
    rows = None
    for name, value in inputs.items():
        model = first[name]
        if type(value) is not np.ndarray or value.ndim == 0 or value.dtype != model.dtype:
            return None
        if value.shape[1:] != model.shape[1:] or (rows is not None and value.shape[0] != rows):
            return None
        rows = value.shape[0]
    return rows


def _private_copy(inputs: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """A copy of a single-array input that the caller cannot change any more (None for other inputs)."""
    if len(inputs) == 1:
        for name, value in inputs.items():
            if type(value) is np.ndarray:
                return {name: value.copy()}
    return None


def _no_answer_message(model: str, attempt: _Attempt) -> str:
    local = attempt.reason + (f" ({attempt.error})" if attempt.error else "")
    return f"no answer for model '{model}': local model {local}; " + "; ".join(attempt.failures)


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
