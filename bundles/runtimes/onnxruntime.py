"""ONNX Runtime: runs variants with target ``onnx`` (.onnx) and ``ort`` (.ort, ORT format).

The session is created once with a fixed thread count (intra-op ``threads``, one inter-op thread,
sequential execution), CPU unless the variant asked for an accelerator the host offers. ``run``
is the hot path: one call into the session (the C++ binding directly on CPU-only sessions, see
:func:`_fast_call`) and a dict built from the output list.
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
        self._call = _fast_call(session)

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
            values = self._call(self._output_list, feeds)
        except Exception as e:  # InvalidArgument, Fail, RuntimeException from the C++ side
            raise InferenceError(f"onnxruntime failed on {self.path.name}: {e}") from e
        return dict(zip(self.output_names, values, strict=True))

    def close(self) -> None:
        self.session = None
        self._call = _closed


def _closed(_names: list[str], _feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    raise InferenceError("the onnxruntime session is closed")


def _fast_call(session: Any) -> Any:
    """The session's run call without the Python wrapper's per-call checks, on CPU-only sessions.

    ``InferenceSession.run`` re-validates input names, WebGPU capture options and OrtValue ownership
    and retries on another provider after an EP failure (~1.5 µs a call). The Predictor has already
    checked names and dtypes and feeds plain numpy arrays, and a CPU-only session has no provider to
    fall back to, so the binding's ``run`` is called directly there; sessions with an accelerator keep
    the public call (its provider fallback matters), as does any onnxruntime without ``_sess``.
    """
    inner = getattr(session, "_sess", None)
    providers = session.get_providers() if hasattr(session, "get_providers") else []
    if inner is None or not callable(getattr(inner, "run", None)) or providers != ["CPUExecutionProvider"]:
        return session.run
    run = inner.run
    return lambda names, feeds: run(names, feeds, None)


def _providers(available: Sequence[str], accelerators: Sequence[str]) -> list[str]:
    """Execution providers for the requested accelerators that this build offers, then CPU."""
    wanted = [_PROVIDERS_BY_ACCELERATOR[a] for a in accelerators if a in _PROVIDERS_BY_ACCELERATOR]
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


__all__ = ["OnnxRuntime"]
