"""Core ML: runs variants with target ``coreml`` (an ML program ``.mlpackage``) through coremltools, on macOS.

coremltools converts models on any OS, but only macOS has the Core ML framework that executes them
(the Linux wheel ships no ``libcoremlpython``: ``predict`` raises "Model prediction is only
supported on macOS"). :meth:`CoreMlRuntime.load` therefore refuses at once elsewhere, with that
reason, instead of failing on the first request. Outputs come back as numpy arrays (float16
outputs of an fp16 model are widened to float32, the type the manifest declares).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bundles.errors import InferenceError, RuntimeUnavailableError

_COMPUTE_UNITS_BY_ACCELERATOR = {"coreml": "ALL", "ane": "ALL", "gpu": "CPU_AND_GPU"}


def unavailable_reason(platform: str | None = None) -> str | None:
    """Why Core ML cannot execute models on this host (None on macOS)."""
    platform = platform or sys.platform
    if platform == "darwin":
        return None
    return f"Core ML executes models only on macOS (this host is {platform}); coremltools cannot predict here"


class CoreMlRuntime:
    """An ML program loaded with ``coremltools.models.MLModel`` (CPU unless the variant asks for more)."""

    name: ClassVar[str] = "coreml"

    def __init__(self, model: Any, path: Path) -> None:
        self.model = model
        self.path = path
        self._lock = threading.Lock()
        description = model.get_spec().description
        self.input_names: tuple[str, ...] = tuple(i.name for i in description.input)
        self.output_names: tuple[str, ...] = tuple(o.name for o in description.output)

    @classmethod
    def load(cls, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> CoreMlRuntime:  # noqa: ARG003
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailableError(reason)
        try:
            import coremltools as ct
        except ImportError as e:
            raise RuntimeUnavailableError("coremltools is not installed (pip install 'edgefleet[coreml]')") from e
        units = next((_COMPUTE_UNITS_BY_ACCELERATOR[a] for a in accelerators if a in _COMPUTE_UNITS_BY_ACCELERATOR),
                     "CPU_ONLY")  # fmt: skip
        try:
            model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units))
        except Exception as e:  # compile errors surface as plain Exceptions
            raise RuntimeUnavailableError(f"Core ML cannot load {path.name}: {e}") from e
        return cls(model, path)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            with self._lock:
                raw = self.model.predict({name: np.asarray(value) for name, value in feeds.items()})
        except Exception as e:
            raise InferenceError(f"Core ML failed on {self.path.name}: {e}") from e
        outputs = {}
        for name in self.output_names:
            value = np.asarray(raw[name])
            outputs[name] = value.astype(np.float32) if value.dtype == np.float16 else value
        return outputs

    def close(self) -> None:
        self.model = None


__all__ = ["CoreMlRuntime", "unavailable_reason"]
