"""LiteRT (ai-edge-litert, formerly TensorFlow Lite): runs variants with target ``tflite``.

The model runs through its default signature when it has one (tensor names are the signature's
input and output names, which converters such as litert-torch write), otherwise through the
interpreter's input and output tensors by name. Inputs are resized to the request's shape, so a
model whose signature has a dynamic batch takes any batch size. ``tflite_runtime`` (the old
standalone wheel) is used when ``ai_edge_litert`` is absent; note that it silently mis-executes
some newer quantised encodings, which is why the converter validates on the runtime it targets.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import InferenceError, RuntimeUnavailableError


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found,unused-ignore]

        return Interpreter
    except ImportError as e:
        raise RuntimeUnavailableError("neither ai-edge-litert nor tflite-runtime is installed") from e


class LiteRtRuntime:
    """A model loaded in a LiteRT interpreter, called through its signature runner.

    An interpreter is not thread-safe, so calls are serialised with a lock.
    """

    name = "litert"

    def __init__(self, interpreter: Any, path: Path) -> None:
        self.interpreter = interpreter
        self.path = path
        self._lock = threading.Lock()
        signatures = interpreter.get_signature_list()
        self._runner = interpreter.get_signature_runner() if signatures else None
        if self._runner is not None:
            self.input_names: tuple[str, ...] = tuple(self._runner.get_input_details())
            self.output_names: tuple[str, ...] = tuple(self._runner.get_output_details())
        else:
            self._inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
            self._outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
            self.input_names, self.output_names = tuple(self._inputs), tuple(self._outputs)

    @classmethod
    def load(cls, path: Path, threads: int = 1, accelerators: Sequence[str] = ()) -> LiteRtRuntime:  # noqa: ARG003
        """Create the interpreter (XNNPACK on CPU); accelerators are not used by this runtime yet."""
        interpreter_class = _interpreter_class()
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=max(1, threads))
            interpreter.allocate_tensors()
        except Exception as e:  # the interpreter raises ValueError/RuntimeError from C++
            raise RuntimeUnavailableError(f"LiteRT cannot load {path.name}: {e}") from e
        return cls(interpreter, path)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            with self._lock:
                if self._runner is not None:
                    return dict(self._runner(**feeds))
                return self._run_tensors(feeds)
        except Exception as e:
            raise InferenceError(f"LiteRT failed on {self.path.name}: {e}") from e

    def _run_tensors(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self.interpreter
        for name, index in self._inputs.items():
            interpreter.resize_tensor_input(index, feeds[name].shape, strict=False)
        interpreter.allocate_tensors()
        for name, index in self._inputs.items():
            interpreter.set_tensor(index, feeds[name])
        interpreter.invoke()
        return {name: interpreter.get_tensor(index) for name, index in self._outputs.items()}

    def close(self) -> None:
        self._runner = None
        self.interpreter = None


__all__ = ["LiteRtRuntime"]
