"""ONNX Runtime: runs variants with target ``onnx`` (.onnx) and ``ort`` (.ort, ORT format).

The session is created once with a fixed thread count (intra-op ``threads``, one inter-op thread,
sequential execution), CPU unless the variant asked for an accelerator the host offers. ``run``
is the hot path: one call into ``InferenceSession.run`` and a dict built from the output list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import InferenceError, RuntimeUnavailableError

_PROVIDERS_BY_ACCELERATOR = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
}
_ERROR_SEVERITY = 3


class OnnxRuntime:
    """A model loaded in an ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_names: tuple[str, ...] = tuple(i.name for i in session.get_inputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        self._output_list = list(self.output_names)

    @classmethod
    def load(cls, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> OnnxRuntime:
        """Create the session; a missing library or an unloadable model is :class:`RuntimeUnavailableError`."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailableError("onnxruntime is not installed (pip install 'edgefleet[onnx]')") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = _ERROR_SEVERITY
        providers = _providers(ort.get_available_providers(), accelerators)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own pybind exception types
            raise RuntimeUnavailableError(f"onnxruntime {ort.__version__} cannot load {path.name}: {e}") from e
        return cls(session, path)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._output_list, feeds)
        except Exception as e:  # InvalidArgument, Fail, RuntimeException from the C++ side
            raise InferenceError(f"onnxruntime failed on {self.path.name}: {e}") from e
        return dict(zip(self.output_names, values, strict=True))

    def close(self) -> None:
        self.session = None


def _providers(available: Sequence[str], accelerators: Sequence[str]) -> list[str]:
    """Execution providers for the requested accelerators that this build offers, then CPU."""
    wanted = [_PROVIDERS_BY_ACCELERATOR[a] for a in accelerators if a in _PROVIDERS_BY_ACCELERATOR]
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


__all__ = ["OnnxRuntime"]
