"""The ``onnx`` target: a single-file ONNX model per precision, run by ONNX Runtime."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.exporters import BuiltVariant
from converter.onnx_tools import load_onnx, make_session, run_session
from converter.quantize import PRECISIONS as LADDER

TARGET = "onnx"
RUNTIME = "onnxruntime"
PRECISIONS = LADDER
ENTRY = "model.onnx"
_MIN_ORT_BY_OPSET = {17: "1.14", 18: "1.16", 19: "1.17", 20: "1.17", 21: "1.20", 22: "1.21"}


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ctx.onnx_variant(precision), out_dir / ENTRY)
    return BuiltVariant(
        target=TARGET,
        precision=precision,
        directory=out_dir,
        entry=ENTRY,
        files=[ENTRY],
        requirements=Requirements(runtime=RUNTIME, min_runtime_version=min_runtime_version(out_dir / ENTRY)),
    )


def min_runtime_version(path: Path) -> str:
    """The oldest ONNX Runtime that implements the model's default-domain opset."""
    model = load_onnx(path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    return _MIN_ORT_BY_OPSET.get(opset, "1.14" if opset < 17 else max(_MIN_ORT_BY_OPSET.values()))


class SessionRunner:
    """An ONNX Runtime session on the variant's entry file (one intra-op thread: stable timings)."""

    def __init__(self, path: Path, what: str) -> None:
        self.session: Any = make_session(path, what=what)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_session(self.session, feeds)


def open_runner(variant: BuiltVariant, runtime: str = RUNTIME, ctx: Any = None) -> SessionRunner:  # noqa: ARG001
    return SessionRunner(variant.entry_path, what=variant.id)


def runtime_version(runtime: str, ctx: BuildContext) -> str:  # noqa: ARG001
    """The ONNX Runtime the gates run on (the variant's requirement stays the opset's minimum)."""
    import onnxruntime

    return str(onnxruntime.__version__)
