"""The interface every runtime implements, and the map from a variant's target to its runtime.

A runtime loads one model file and runs feeds (already validated numpy arrays, keyed by input
name) to outputs keyed by output name. Everything else (schema checks, pre/post-processing,
batching, golden self-tests) is the :class:`bundles.predictor.Predictor`'s job, so adding a runtime
means writing ``load``, ``run`` and ``close`` only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from bundles.errors import RuntimeUnavailableError


@runtime_checkable
class Runtime(Protocol):
    """A loaded model in some inference engine."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; raise :class:`bundles.errors.InferenceError` on failure."""
        ...

    def close(self) -> None:
        """Release the engine's resources; the runtime is unusable afterwards."""
        ...


class RuntimeLoader(Protocol):
    """What a runtime class offers to load a model file."""

    def load(self, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> Runtime: ...


RUNTIMES_BY_TARGET: dict[str, tuple[str, str]] = {
    "onnx": ("bundles.runtimes.onnxruntime", "OnnxRuntime"),
    "ort": ("bundles.runtimes.onnxruntime", "OnnxRuntime"),
    "tflite": ("bundles.runtimes.litert", "LiteRtRuntime"),
}
"""Variant target -> (module, class). Core ML and GGUF arrive in wave 2 through the same interface."""


def load_runtime(target: str, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> Runtime:
    """Load ``path`` with the runtime for ``target``; :class:`RuntimeUnavailableError` if there is none."""
    if target not in RUNTIMES_BY_TARGET:
        raise RuntimeUnavailableError(f"no runtime for target '{target}' in this version of edgefleet")
    module_name, class_name = RUNTIMES_BY_TARGET[target]
    loader: RuntimeLoader = getattr(importlib.import_module(module_name), class_name)
    return loader.load(path, threads=threads, accelerators=accelerators)


__all__ = ["RUNTIMES_BY_TARGET", "Runtime", "RuntimeLoader", "load_runtime"]
