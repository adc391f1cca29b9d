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


RUNTIMES_BY_NAME: dict[str, tuple[str, str]] = {
    "onnxruntime": ("bundles.runtimes.onnxruntime", "OnnxRuntime"),
    "litert": ("bundles.runtimes.litert", "LiteRtRuntime"),
    "tflite_runtime": ("bundles.runtimes.litert", "TfliteRuntime"),
    "coreml": ("bundles.runtimes.coreml", "CoreMlRuntime"),
    "llama_cpp": ("bundles.runtimes.llama_cpp", "LlamaCppRuntime"),
}
"""Runtime name (``Requirements.runtime``, ``validated_runtimes``) -> (module, class)."""

RUNTIMES_BY_TARGET: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "ort": ("onnxruntime",),
    "tflite": ("litert", "tflite_runtime"),
    "coreml": ("coreml",),
    "gguf": ("llama_cpp",),
}
"""Variant target -> the runtimes that can execute it, the default first."""


def load_runtime(
    target: str, path: Path, threads: int = 1, accelerators: Sequence[str] = (), runtime: str | None = None
) -> Runtime:
    """Load ``path`` with ``runtime`` (default: the target's first); :class:`RuntimeUnavailableError` if impossible."""
    names = RUNTIMES_BY_TARGET.get(target)
    if names is None:
        raise RuntimeUnavailableError(f"no runtime for target '{target}' in this version of edgefleet")
    name = runtime or names[0]
    if name not in names or name not in RUNTIMES_BY_NAME:
        raise RuntimeUnavailableError(f"runtime '{name}' cannot run target '{target}' (runtimes: {', '.join(names)})")
    module_name, class_name = RUNTIMES_BY_NAME[name]
    loader: RuntimeLoader = getattr(importlib.import_module(module_name), class_name)
    return loader.load(path, threads=threads, accelerators=accelerators)


__all__ = ["RUNTIMES_BY_NAME", "RUNTIMES_BY_TARGET", "Runtime", "RuntimeLoader", "load_runtime"]
