"""The ``ort`` target: ORT-format models for ONNX Runtime Mobile, with the reduced-build operator config.

Each precision's ONNX model is converted by ``onnxruntime.tools.convert_onnx_models_to_ort``
(fixed optimisation style) to ``model.ort``; ``required_operators.config`` lists the operators and
types a reduced-operator ORT Mobile build must include (``build.sh --include_ops_by_config``).
ORT-format fp32 runs slower than plain ONNX on x86 (layout optimisations are not baked in), so an
``ort`` variant is compared with the ``ort`` fp32 parent, never with the ``onnx`` one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bundles.errors import ConversionError
from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.exporters import BuiltVariant
from converter.exporters.onnx import SessionRunner, min_runtime_version
from converter.onnx_tools import first_line
from converter.quantize import PRECISIONS as LADDER

TARGET = "ort"
RUNTIME = "onnxruntime"
PRECISIONS = LADDER
ENTRY = "model.ort"
CONFIG = "required_operators.config"


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_path = ctx.onnx_variant(precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-ort-") as temp:
        source = Path(temp) / "in" / "model.onnx"
        source.parent.mkdir()
        shutil.copyfile(onnx_path, source)
        try:
            with _quiet():
                convert_onnx_models_to_ort(
                    source.parent, output_dir=Path(temp) / "out", optimization_styles=[OptimizationStyle.Fixed]
                )
        except Exception as e:
            raise ConversionError(f"conversion to the ORT format failed: {first_line(e)}") from e
        _collect(Path(temp) / "out", out_dir)
    return BuiltVariant(
        target=TARGET,
        precision=precision,
        directory=out_dir,
        entry=ENTRY,
        files=[ENTRY, CONFIG],
        requirements=Requirements(runtime=RUNTIME, min_runtime_version=min_runtime_version(onnx_path)),
    )


def _collect(converted: Path, out_dir: Path) -> None:
    ort_file = converted / "model.ort"
    config = next(iter(sorted(converted.glob("required_operators*.config"))), None)
    if not ort_file.exists() or config is None:
        raise ConversionError("conversion to the ORT format produced no model.ort (see ONNX Runtime's log)")
    shutil.copyfile(ort_file, out_dir / ENTRY)
    shutil.copyfile(config, out_dir / CONFIG)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The ORT tool logs every model it converts; keep the CLI output ours."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def open_runner(variant: BuiltVariant) -> SessionRunner:
    return SessionRunner(variant.entry_path, what=variant.id)
