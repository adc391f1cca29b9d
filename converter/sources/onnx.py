"""ONNX files as a source: stored as one self-contained file, run in ONNX Runtime as the reference.

A model saved with external data (``model.onnx`` + ``model.onnx.data``, torch 2.13's default) is
loaded with its data and re-saved as a single file, so no later step can lose the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bundles.errors import ConfigError, ConversionError
from converter.onnx_tools import check_inputs_match_spec, load_onnx, make_session, run_session, save_canonical
from converter.spec import ModelSpec

EXTENSIONS = (".onnx",)
STORED_NAME = "model.onnx"


def stage(ref: str, weights: Path | None, dest: Path, random_init: bool = False) -> list[str]:
    if weights is not None or random_init:
        raise ConfigError("an ONNX source carries its own weights: drop --weights / --random-init")
    path = Path(ref)
    if not path.is_file():
        raise ConfigError(f"ONNX file {path} does not exist")
    save_canonical(load_onnx(path), dest / STORED_NAME)
    return [STORED_NAME]


class OnnxSource:
    """The registered ONNX file, executed by ONNX Runtime."""

    kind = "onnx"
    class_values: tuple[str, ...] = ()

    def __init__(self, path: Path, spec: ModelSpec) -> None:
        self.path = path
        check_inputs_match_spec(load_onnx(path), spec.inputs, "source", error=ConfigError)
        self.session = make_session(path, what="source")

    def check(self, feature_names: tuple[str, ...]) -> None:
        """The inputs were checked against the spec when the file was loaded."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_session(self.session, inputs)

    def export_onnx(self, out_path: Path) -> None:
        try:
            shutil.copyfile(self.path, out_path)
        except OSError as e:
            raise ConversionError(f"cannot copy the ONNX source to {out_path}: {e}") from e


def load(files: list[Path], spec: ModelSpec) -> OnnxSource:
    return OnnxSource(files[0], spec)
