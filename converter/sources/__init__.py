"""Model sources: how a registered model is stored, executed as the reference and exported to ONNX.

One module per source kind (``converter/sources/<kind>.py``), found by name: adding a kind means
adding a module with the same three functions, never editing a table here. Each module provides

- ``EXTENSIONS``: file suffixes that imply this kind when the user gives no ``kind:`` prefix;
- ``stage(ref, weights, dest, random_init=False) -> list[str]``: copy what is needed into ``dest``
  (the immutable artifacts directory being built) and return the stored file names, main file
  first; refuse options that do not apply to the kind;
- ``load(files, spec) -> SourceModel``: the model ready to run and export.

The source model's outputs are the reference every variant is gated against.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from bundles.errors import ConfigError
from converter.spec import ModelSpec


class SourceModel(Protocol):
    """A loaded source model: the reference outputs and an fp32 single-file ONNX export."""

    kind: str
    class_values: tuple[str, ...]
    """The model's own class values as text, in output column order (scikit-learn's ``classes_``), else ()."""

    def check(self, feature_names: tuple[str, ...]) -> None:
        """Registration-time checks of the spec (and the eval file's column names) against the model."""
        ...

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name (the same names as the exported ONNX graph's outputs)."""
        ...

    def export_onnx(self, out_path: Path) -> None:
        """Write the fp32 model as one self-contained ONNX file (no external data)."""
        ...


def split_ref(ref: str) -> tuple[str, str]:
    """``"torch:train.py:make_model"`` -> ``("torch", "train.py:make_model")``; infer the kind from the suffix."""
    head, sep, rest = ref.partition(":")
    if sep and head in _known_kinds():
        return head, rest
    for kind in _known_kinds():
        if any(ref.endswith(ext) for ext in source_module(kind).EXTENSIONS):
            return kind, ref
    raise ConfigError(
        f"source '{ref}' names no known kind: write it as kind:path with kind one of {', '.join(_known_kinds())}"
    )


def _known_kinds() -> tuple[str, ...]:
    here = Path(__file__).parent
    found = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    return tuple(found)


def source_module(kind: str) -> ModuleType:
    """The module implementing ``kind`` (ConfigError when there is none)."""
    if kind not in _known_kinds():
        raise ConfigError(f"source kind '{kind}' is not available (known: {', '.join(_known_kinds())})")
    return importlib.import_module(f"converter.sources.{kind}")


def stage_source(kind: str, ref: str, weights: Path | None, dest: Path, random_init: bool = False) -> list[str]:
    stored: list[str] = source_module(kind).stage(ref, weights, dest, random_init=random_init)
    return stored


def load_source(kind: str, files: list[Path], spec: ModelSpec) -> SourceModel:
    model: SourceModel = source_module(kind).load(files, spec)
    return model
