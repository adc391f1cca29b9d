"""LiteRT (``ai-edge-litert``) and the old ``tflite-runtime`` wheel: run variants with target ``tflite``.

Two runtimes, two names, never one standing in for the other: :class:`LiteRtRuntime` (``litert``)
imports only ``ai_edge_litert`` and :class:`TfliteRuntime` (``tflite_runtime``) only
``tflite_runtime``. tflite-runtime 2.14 loads models written by newer converters and silently
computes garbage on some of them (ai-edge-quantizer's dynamic-range int8: 98 % accuracy becomes
9.5 %), so a variant runs only on a runtime the converter validated it on
(:func:`bundles.selection.validated_runtime_for`), and the runtime that runs it says its own name.

The model runs through its default signature when it has one (tensor names are the signature's
input and output names, which litert-torch writes from the source's names), otherwise through
the interpreter's tensors by name. What the model's tensors need is done here, from the tensors'
own parameters, so that a caller feeds the tensors the source model takes:

- int8 / int16 / uint8 inputs with a quantisation scale are quantised
  (``round(x / scale) + zero_point``, clipped to the type's range) and such outputs dequantised to
  float32 (``(q - zero_point) * scale``);
- other inputs are cast to the model's type when the request's differs (int64 token ids to a
  model's int32, float64 to float32);
- a model converted with a fixed batch of 1 (litert-torch cannot lower every model with a dynamic
  batch) runs a larger batch row by row and concatenates the outputs.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bundles.errors import InferenceError, RuntimeUnavailableError

_QUANTISED_KINDS = ("i", "u")


@dataclass(frozen=True)
class TensorIO:
    """One model input or output: its type, quantisation parameters and whether its batch is fixed at 1."""

    name: str
    dtype: np.dtype[Any]
    scale: float
    zero_point: int
    fixed_batch_1: bool

    @classmethod
    def of(cls, name: str, details: Mapping[str, Any]) -> TensorIO:
        """From an interpreter's tensor details; per-axis quantised I/O is refused (no converter writes it)."""
        params = details.get("quantization_parameters") or {}
        scales = np.asarray(params.get("scales", []))
        if scales.size > 1:
            raise RuntimeUnavailableError(f"tensor '{name}' is quantised per axis, which model I/O cannot be here")
        scale, zero_point = details.get("quantization", (0.0, 0))
        dtype = np.dtype(details["dtype"])
        signature = details.get("shape_signature", details.get("shape"))
        fixed = signature is not None and len(signature) > 0 and int(signature[0]) == 1
        quantised = dtype.kind in _QUANTISED_KINDS and float(scale) > 0
        return cls(name, dtype, float(scale) if quantised else 0.0, int(zero_point), fixed)

    def encode(self, value: np.ndarray) -> np.ndarray:
        """A request array as the model takes it (quantised or cast)."""
        if self.scale:
            info = np.iinfo(self.dtype)
            quantised = np.round(np.asarray(value, dtype=np.float32) / self.scale) + self.zero_point
            encoded: np.ndarray = np.clip(quantised, info.min, info.max).astype(self.dtype)
            return encoded
        return value if value.dtype == self.dtype else value.astype(self.dtype)

    def decode(self, value: np.ndarray) -> np.ndarray:
        """A model output as the source gave it (dequantised to float32)."""
        if self.scale:
            decoded: np.ndarray = (value.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
            return decoded.astype(np.float32)
        return value


class LiteRtRuntime:
    """A model loaded in a LiteRT interpreter, called through its signature runner.

    An interpreter is not thread-safe, so calls are serialised with a lock.
    """

    name: ClassVar[str] = "litert"
    module: ClassVar[str] = "ai_edge_litert.interpreter"
    distribution: ClassVar[str] = "ai-edge-litert"

    def __init__(self, interpreter: Any, path: Path) -> None:
        self.interpreter = interpreter
        self.path = path
        self._lock = threading.Lock()
        signatures = interpreter.get_signature_list()
        self._runner = interpreter.get_signature_runner() if signatures else None
        if self._runner is not None:
            inputs, outputs = self._runner.get_input_details(), self._runner.get_output_details()
        else:
            inputs = {d["name"]: d for d in interpreter.get_input_details()}
            outputs = {d["name"]: d for d in interpreter.get_output_details()}
        self._inputs = {name: TensorIO.of(name, d) for name, d in inputs.items()}
        self._outputs = {name: TensorIO.of(name, d) for name, d in outputs.items()}
        self._index = {name: int(d["index"]) for name, d in {**inputs, **outputs}.items()}
        self.input_names: tuple[str, ...] = tuple(self._inputs)
        self.output_names: tuple[str, ...] = tuple(self._outputs)
        self.fixed_batch_1 = bool(self._inputs) and all(t.fixed_batch_1 for t in self._inputs.values())

    @classmethod
    def load(cls, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> LiteRtRuntime:  # noqa: ARG003
        """Create the interpreter (XNNPACK on CPU); accelerators are not used by this runtime yet."""
        interpreter_class = cls._interpreter_class()
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=max(1, threads))
            interpreter.allocate_tensors()
            return cls(interpreter, path)
        except RuntimeUnavailableError:
            raise
        except Exception as e:  # the interpreter raises ValueError/RuntimeError from C++
            raise RuntimeUnavailableError(f"{cls.name} cannot load {path.name}: {e}") from e

    @classmethod
    def _interpreter_class(cls) -> Any:
        try:
            return importlib.import_module(cls.module).Interpreter
        except ImportError as e:
            raise RuntimeUnavailableError(f"{cls.distribution} is not installed ({cls.name}: {e})") from e

    @classmethod
    def version(cls) -> str:
        """The installed version of this runtime's distribution ("" when unknown)."""
        from importlib import metadata

        try:
            return metadata.version(cls.distribution)
        except metadata.PackageNotFoundError:
            return ""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            encoded = {name: self._inputs[name].encode(np.asarray(value)) for name, value in feeds.items()}
            with self._lock:
                raw = self._run_rows(encoded) if self._needs_rows(encoded) else self._invoke(encoded)
            return {name: self._outputs[name].decode(value) for name, value in raw.items()}
        except (KeyError, TypeError) as e:
            raise InferenceError(f"{self.name} cannot take these inputs for {self.path.name}: {e}") from e
        except InferenceError:
            raise
        except Exception as e:
            raise InferenceError(f"{self.name} failed on {self.path.name}: {e}") from e

    def _needs_rows(self, feeds: Mapping[str, np.ndarray]) -> bool:
        return self.fixed_batch_1 and any(v.ndim > 0 and v.shape[0] != 1 for v in feeds.values())

    def _run_rows(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A fixed-batch-1 model over a batch: one call per row, outputs concatenated (batch first)."""
        rows = {v.shape[0] for v in feeds.values()}
        if len(rows) != 1:
            raise InferenceError(f"inputs of {self.path.name} have different batch sizes {sorted(rows)}")
        parts = [self._invoke({n: v[i : i + 1] for n, v in feeds.items()}) for i in range(rows.pop())]
        if not parts:
            raise InferenceError(f"{self.path.name}: an empty batch")
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return dict(self._runner(**feeds))
        interpreter = self.interpreter
        for name in self._inputs:
            interpreter.resize_tensor_input(self._index[name], feeds[name].shape, strict=False)
        interpreter.allocate_tensors()
        for name in self._inputs:
            interpreter.set_tensor(self._index[name], feeds[name])
        interpreter.invoke()
        return {name: interpreter.get_tensor(self._index[name]) for name in self._outputs}

    def close(self) -> None:
        self._runner = None
        self.interpreter = None


class TfliteRuntime(LiteRtRuntime):
    """The same model in the standalone ``tflite-runtime`` wheel (2.14: numpy < 2, older kernels)."""

    name: ClassVar[str] = "tflite_runtime"
    module: ClassVar[str] = "tflite_runtime.interpreter"
    distribution: ClassVar[str] = "tflite-runtime"


__all__ = ["LiteRtRuntime", "TensorIO", "TfliteRuntime"]
