"""The serving pipeline: every prediction the agent answers goes through here.

Flow of one request: :meth:`ServingPipeline.predict` asks the local engine for an answer (with the
bundle's deadline); when the local answer is missing, late, failed or not confident enough, the
fallback chain (``device_agent.fallback``) tries the cloud endpoint, the previous local version, a
cached result for an identical input and the bundle's static answer, in that order. The answer is a
:class:`PredictResult` that says where it came from and why. A recorder (``device_agent.telemetry``)
sees every answer, to count it in the current metric window and perhaps keep it as a sample.

The agent builds one pipeline at start-up and calls it from its Python API and its localhost
server; it never calls the local engine directly for a user request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bundles.manifest import Manifest

SOURCES = ("local", "cloud", "previous", "cache", "static")
"""Where an answer came from (persisted strings, stable)."""


class PredictionLike(Protocol):
    """What ``bundles.predictor.Prediction`` offers: post-processed outputs and raw model outputs."""

    @property
    def outputs(self) -> Mapping[str, np.ndarray]: ...

    @property
    def raw(self) -> Mapping[str, np.ndarray]: ...


class PredictorLike(Protocol):
    """What ``bundles.predictor.Predictor`` offers to the pipeline."""

    def predict(self, inputs: dict[str, np.ndarray]) -> Any: ...


class LocalEngine(Protocol):
    """The agent's local inference engine, as the pipeline uses it."""

    def ready(self, model: str) -> bool: ...

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any: ...

    def active_manifest(self, model: str) -> Manifest | None: ...

    def previous_predictor(self, model: str) -> Any: ...


class Recorder(Protocol):
    """Sees every answer (telemetry). Must be cheap: it runs on the request path."""

    def record(self, inputs: Mapping[str, np.ndarray], result: PredictResult, error: str | None = None) -> None: ...


@dataclass(frozen=True)
class PredictResult:
    """One answer and its provenance.

    ``source`` is one of :data:`SOURCES`; ``version`` is the bundle version that produced it (the
    cloud's version if it says one, else ``None``); ``fallback_reason`` says why the local model
    did not answer (``None`` when it did).
    """

    outputs: dict[str, np.ndarray]
    source: str
    model: str
    version: int | None
    latency_ms: float
    fallback_reason: str | None = None
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
        }


@dataclass(frozen=True)
class ServingConfig:
    """Fallback settings; built from the ``fallback`` section of the desired state.

    ``cloud_url`` is the OIP v2 base URL (``https://host/v2``); ``cloud_model`` maps a local model
    name to the cloud's model name when they differ.
    """

    cloud_url: str | None = None
    cloud_model: dict[str, str] = field(default_factory=dict)
    cloud_timeout_s: float = 2.0
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    cache_entries: int = 256
    fallback_on_low_confidence: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ServingConfig:
        """From the desired state's ``fallback`` object (``{"url", "model"}``) or ``None``."""
        if not data:
            return cls()
        model = data.get("model")
        mapping = {str(model): str(model)} if isinstance(model, str) else dict(data.get("models", {}))
        return cls(cloud_url=data.get("url"), cloud_model=mapping)


class ServingPipeline:
    """Answers predictions locally and falls back along the chain when it must."""

    def __init__(
        self,
        local: LocalEngine,
        config: ServingConfig | None = None,
        recorder: Recorder | None = None,
        cloud: Any = None,
    ) -> None:
        self.local = local
        self.config = config or ServingConfig()
        self.recorder = recorder
        self.cloud = cloud

    def predict(self, model: str, inputs: dict[str, np.ndarray]) -> PredictResult:
        """One prediction with its provenance (pass-through to the local engine for now)."""
        import time

        start = time.perf_counter()
        prediction = self.local.predict(model, inputs, timeout_s=None)
        manifest = self.local.active_manifest(model)
        return PredictResult(
            outputs=dict(prediction.outputs),
            source="local",
            model=model,
            version=None if manifest is None else manifest.version,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            raw=dict(getattr(prediction, "raw", {}) or {}),
        )

    def predict_batch(self, model: str, batch: Sequence[dict[str, np.ndarray]]) -> list[PredictResult]:
        """Several predictions, each with its own provenance."""
        return [self.predict(model, inputs) for inputs in batch]

    def close(self) -> None:
        """Release the cloud client and flush the recorder."""
        close = getattr(self.cloud, "close", None)
        if callable(close):
            close()
