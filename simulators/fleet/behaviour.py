"""The shortcut for inference: a latency and error model instead of running the model.

A virtual device does not load its bundle into a runtime (10,000 ONNX sessions do not fit one
process). It answers each simulated request with one of the bundle's *golden* cases: the golden
inputs are the request, the golden expected outputs (through the bundle's real post-processing) are
the answer, and the latency is the board's (:mod:`.profiles`) with jitter. A bad bundle version
changes that per its ``behaviour``:

* ``errors``: a share (``rate``) of requests fails (the recorder counts an error);
* ``nan``: a share of answers has NaN outputs (post-processing turns them into class 0, so the
  predicted-class distribution drifts, and the window counts ``nan_output`` violations);
* ``slow``: latency 20x the board's;
* ``drift_inputs``: inputs shifted far outside the training baseline (feature PSI);
* ``drift_predictions``: every answer is the same class (output PSI).

The answers go through the real telemetry recorder, so the windows the server folds are the agent's.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bundles.manifest import Manifest
from bundles.processing import apply_steps
from bundles.tensors import decode_tensor


@dataclass(frozen=True)
class Answer:
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    latency_ms: float
    error: str | None = None


class ModelBehaviour:
    """Answers for one bundle version on one board."""

    def __init__(self, manifest: Manifest, behaviour: str = "good", rate: float = 1.0) -> None:
        self.manifest, self.behaviour, self.rate = manifest, behaviour, rate
        self.cases = [self._case(c.inputs, c.expected) for c in manifest.golden.cases]

    def _case(self, inputs: Mapping[str, object], expected: Mapping[str, object]) -> Answer:
        x = {k: decode_tensor(v) for k, v in inputs.items()}  # type: ignore[arg-type]
        raw = {k: decode_tensor(v) for k, v in expected.items()}  # type: ignore[arg-type]
        if self.behaviour == "drift_inputs":
            x = {k: v + np.float32(6.0) for k, v in x.items()}
        if self.behaviour == "drift_predictions":
            raw = {k: np.zeros_like(v) + np.arange(v.shape[-1], dtype=v.dtype) * 10 for k, v in raw.items()}
        return Answer(x, self._post(raw), 0.0)

    def _post(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        post = apply_steps(self.manifest.postprocess, raw, "post") if self.manifest.postprocess else {}
        return {**raw, **post}

    def answer(self, rng: random.Random, base_latency_ms: float) -> Answer:
        case = self.cases[rng.randrange(len(self.cases))]
        latency = base_latency_ms * rng.uniform(0.8, 1.3) * (20.0 if self.behaviour == "slow" else 1.0)
        hit = rng.random() < self.rate
        if self.behaviour == "errors" and hit:
            return Answer(case.inputs, None, latency, "simulated model error")
        if self.behaviour == "nan" and hit:
            nan = {k: np.full_like(v, np.nan) for k, v in case.outputs.items() if v.dtype.kind == "f"}  # type: ignore[union-attr]
            return Answer(case.inputs, self._post({k: v for k, v in nan.items() if k in self._raw_names()}), latency)
        return Answer(case.inputs, case.outputs, latency)

    def _raw_names(self) -> set[str]:
        return {t.name for t in self.manifest.outputs}
