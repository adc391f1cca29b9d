"""Precision variants of an fp32 ONNX model, made with ONNX Runtime's and onnxconverter-common's tools.

The recipes encode what was measured on x86 CPUs (``shared/research/toolchain_feasibility.md``):

- ``int8-static``: QDQ, per-channel weights, calibrated on the registered calibration data
  (MinMax / Entropy / Percentile), with the layer that produces a graph output kept in float:
  quantising the final Gemm clips the logits to the calibrated range. Biases stay float: an int32
  bias with its per-channel scale and zero point takes three times the bytes, and on the digits
  CNN the float-bias model ran at the same speed (size 29 % of fp32 instead of 30 %).
- ``int8-dynamic``: dynamic quantisation of MatMul/Gemm only. Dynamic Conv (ConvInteger) ran 2-9x
  slower than fp32; it stays available as ``int8-dynamic-all`` for when it helps, and the gates
  refuse it when it is slower than its float parent.
- ``fp16``: weights and compute in float16, float32 inputs and outputs kept (``keep_io_types``).

Every recipe runs ``quant_pre_process`` (shape inference and graph optimisation) first.
A recipe that finds nothing to quantise raises :class:`GateFailedError` so the ladder records why.
Every result is saved in canonical order (:func:`converter.onnx_tools.canonicalize`), so the same
fp32 model gives the same bytes whatever the Python hash seed.

ONNX Runtime's symbolic shape inference writes ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data``
file into the *current directory* when it gives up (sklearn pipelines with a Scaler, encoders):
the converter runs every recipe inside its private work directory under ``$EDGEFLEET_HOME``
(:func:`converter.home.scratch_dir`), and :func:`_no_litter` removes those files at once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError, GateFailedError
from converter.datasets import Dataset
from converter.onnx_tools import first_line, load_onnx

PRECISIONS = ("int8-static", "int8-dynamic", "fp16", "fp32")
"""The automatic ladder, most aggressive first."""
EXTRA_PRECISIONS = ("int8-dynamic-all",)
"""Recipes that are never tried automatically but can be asked for by name."""
QUANTISED_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                 "QLinearMatMul", "QGemm")  # fmt: skip
_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
_CALIBRATION_ROWS = 512
_FLOAT_DEFAULT = {"DefaultTensorType": 1}
"""onnx.TensorProto.FLOAT for tensors whose type shape inference could not tell: the output of an
``ai.onnx.ml`` operator (a scikit-learn pipeline's Scaler) feeding a MatMul, which the quantiser
otherwise refuses ("Unable to find data type for weight_name")."""
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(\.data)?$")


def make_precision(
    fp32_path: Path, precision: str, out_path: Path, calibration: Dataset | None, method: str, max_batch: int
) -> None:
    """Write ``fp32_path`` at ``precision`` to ``out_path``."""
    if precision == "fp32":
        shutil.copyfile(fp32_path, out_path)
    elif precision == "fp16":
        _to_fp16(fp32_path, out_path)
    elif precision.startswith("int8") and not _has_compute_ops(fp32_path):
        raise GateFailedError("nothing to quantise: the model has no Conv, MatMul or Gemm operator (e.g. trees)")
    elif precision in ("int8-dynamic", "int8-dynamic-all"):
        _to_dynamic_int8(fp32_path, out_path, all_ops=precision == "int8-dynamic-all")
    elif precision == "int8-static":
        if calibration is None:
            raise GateFailedError("static int8 needs calibration data: register the model with --calibration")
        _to_static_int8(fp32_path, out_path, calibration, method, max_batch)
    else:
        known = ", ".join(PRECISIONS + EXTRA_PRECISIONS)
        raise ConversionError(f"precision '{precision}' is not one of {known}")
    if precision != "fp32":
        _canonical_file(out_path)
        _require_loadable(out_path, precision)


def _canonical_file(path: Path) -> None:
    from converter.onnx_tools import save_canonical

    save_canonical(load_onnx(path), path)


def _require_loadable(path: Path, precision: str) -> None:
    """The recipes can emit graphs ONNX Runtime refuses (fp16 Cast type mismatches): refuse the rung, not the run."""
    from converter.onnx_tools import make_session

    try:
        make_session(path, what=f"the {precision} model")
    except ConversionError as e:
        raise GateFailedError(f"{precision} recipe produced a model ONNX Runtime cannot load: {e}") from e


def _to_fp16(fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    try:
        with _quiet():
            model = float16.convert_float_to_float16(load_onnx(fp32_path), keep_io_types=True)
        onnx.save_model(model, str(out_path))
    except Exception as e:
        raise GateFailedError(f"fp16 conversion failed: {type(e).__name__}: {first_line(e)}") from e


def _to_dynamic_int8(fp32_path: Path, out_path: Path, all_ops: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = None if all_ops else ["MatMul", "Gemm"]
    with _preprocessed(fp32_path) as pre:
        try:
            with _quiet():
                quantize_dynamic(pre, out_path, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                                 extra_options=_FLOAT_DEFAULT)  # fmt: skip
        except Exception as e:
            raise GateFailedError(f"dynamic int8 quantisation failed: {first_line(e)}") from e
    _require_quantised(out_path, "MatMul/Gemm" if not all_ops else "quantisable")


def _to_static_int8(fp32_path: Path, out_path: Path, calibration: Dataset, method: str, max_batch: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    with _preprocessed(fp32_path) as pre:
        keep_float = output_layers(load_onnx(pre))
        try:
            with _quiet():
                quantize_static(
                    pre, out_path, _Reader(calibration, max_batch), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method], nodes_to_exclude=keep_float,
                    extra_options={"QuantizeBias": False, **_FLOAT_DEFAULT},
                )  # fmt: skip
        except Exception as e:
            raise GateFailedError(f"static int8 quantisation failed: {type(e).__name__}: {first_line(e)}") from e
    _require_quantised(out_path, "Conv/MatMul/Gemm")


def output_layers(model: Any) -> list[str]:
    """Names of the compute nodes (Conv/Gemm/MatMul) whose result reaches a graph output unchanged in kind.

    Walks back from each graph output through shape-only and elementwise nodes (Reshape, Softmax,
    Add, ...) to the first compute node: that is the layer whose quantisation would clip the outputs.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    found: list[str] = []
    for output in model.graph.output:
        node = producers.get(output.name)
        for _ in range(8):
            if node is None or node.op_type in _COMPUTE_OPS:
                break
            node = producers.get(node.input[0]) if node.input else None
        if node is not None and node.op_type in _COMPUTE_OPS and node.name not in found:
            found.append(node.name)
    return found


def _has_compute_ops(path: Path) -> bool:
    return any(node.op_type in _COMPUTE_OPS for node in load_onnx(path).graph.node)


def _require_quantised(path: Path, what: str) -> None:
    ops = {node.op_type for node in load_onnx(path).graph.node}
    if not ops & set(QUANTISED_OPS):
        raise GateFailedError(f"nothing to quantise: the model has no {what} operator the recipe can change")


@contextlib.contextmanager
def _preprocessed(fp32_path: Path) -> Iterator[Path]:
    """``quant_pre_process`` output in a temp dir.

    Symbolic shape inference gives up on some graphs (random ops, ML-domain trees) and then dumps
    ``sym_shape_infer_temp.onnx`` into the current directory: that file is removed, and the model
    is pre-processed without symbolic inference, or used as is if even that fails.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as temp:
        pre = Path(temp) / "preprocessed.onnx"
        if not any(_try_pre_process(quant_pre_process, fp32_path, pre, skip) for skip in (False, True)):
            shutil.copyfile(fp32_path, pre)
        yield pre


def _try_pre_process(pre_process: Any, fp32_path: Path, out_path: Path, skip_symbolic: bool) -> bool:
    try:
        with _quiet(), _no_litter():
            pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=skip_symbolic)
    except Exception as e:  # ORT raises bare Exception here ("Incomplete symbolic shape inference")
        logging.getLogger(__name__).debug("quant_pre_process (skip_symbolic=%s) failed: %s", skip_symbolic, e)
        return False
    return True


@contextlib.contextmanager
def _no_litter() -> Iterator[None]:
    """Remove files ONNX Runtime's shape inference leaves in the working directory when it fails.

    They are ``sym_shape_infer_temp.onnx`` and its external data, named ``<uuid>.data`` by onnx.
    """
    before = set(os.listdir("."))
    try:
        yield
    finally:
        for name in set(os.listdir(".")) - before:
            if name.startswith("sym_shape_infer_temp") or _UUID_RE.match(name):
                Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantisers print progress (Entropy histograms) to stdout; keep the CLI output ours."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class _Reader:
    """``CalibrationDataReader`` over the registered calibration rows, in batches the model accepts."""

    def __init__(self, calibration: Dataset, max_batch: int) -> None:
        rows = min(calibration.rows, _CALIBRATION_ROWS)
        step = max(1, min(max_batch, rows))
        usable = rows - rows % step  # equal batches: the Entropy/Percentile collectors stack them into one array
        self._batches = iter([calibration.take(i, i + step) for i in range(0, usable, step)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # required by the interface for some calibrators; single pass is enough here
        return None
