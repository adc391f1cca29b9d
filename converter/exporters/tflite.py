"""The ``tflite`` target: LiteRT flatbuffers from PyTorch sources, quantised with ai-edge-quantizer.

Export. ``litert_torch.convert`` (no TensorFlow) lowers the source module, wrapped so that the
signature's input and output names are the spec's and the source's (``x`` -> ``logits``, not
``args_0`` -> ``output_0``). litert-torch keeps the source's layout at the model's inputs and
outputs (an NCHW source stays NCHW; it transposes inside), and the exporter checks the file's
input shapes against the spec, so a device feeds the tensors the source takes. A dynamic batch
is tried first; litert-torch cannot lower every model with one (``x.flatten(1)`` in the digits
CNN fails in its JAX bridge), and then the model is converted with a batch of 1, which the
runtime runs row by row for larger batches (``details.batch`` says which).

Reach. litert-torch converts PyTorch modules only: a scikit-learn or ONNX source, or a module
with an operator litert-torch cannot lower, is refused for this target with the converter's own
reason, and the other targets go on.

Precisions (``PRECISIONS``, most aggressive first; recipes of ai-edge-quantizer on the fp32 file):

| precision | recipe | model I/O |
|---|---|---|
| ``int4-weight`` | ``weight_only_wi4_afp32`` (weights int4 per channel, float compute) | float32 |
| ``int8-static`` | ``static_wi8_ai8`` calibrated on the registered calibration data | int8 (quantised by the runtime) |
| ``int8-dynamic`` | ``dynamic_wi8_afp32`` (int8 weights, activations quantised on the fly) | float32 |
| ``int8-weight`` | ``weight_only_wi8_afp32`` | float32 |
| ``fp16`` | float casting of the weights to float16 (float compute) | float32 |
| ``int8-static-a16`` (by name) | ``static_wi8_ai16`` | int16 |

Runtimes. Every variant is gated in LiteRT (``litert``, ai-edge-litert) and in the old
``tflite-runtime`` 2.14 (``tflite_runtime``, run in its own environment through
:mod:`converter.workers`); the variant's requirements list the runtimes it passed on. The old
runtime loads ai-edge-quantizer's dynamic-range int8 and computes garbage without an error, so
only measured parity decides, never a load.
"""

from __future__ import annotations

import inspect
import keyword
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError, GateFailedError, RuntimeUnavailableError
from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.datasets import Dataset
from converter.exporters import BuiltVariant, Runner, example_inputs, torch_module
from converter.onnx_tools import first_line
from converter.quiet import log_tail, native_output_to
from converter.spec import ModelSpec

TARGET = "tflite"
RUNTIME = "litert"
RUNTIMES = ("litert", "tflite_runtime")
VALIDATED_RUNTIMES_BIND = True
PRECISIONS = ("int4-weight", "int8-static", "int8-dynamic", "int8-weight", "fp16", "fp32")
EXTRA_PRECISIONS = ("int8-static-a16",)
ENTRY = "model.tflite"
SIGNATURE = "serving_default"
CALIBRATION_ROWS = 512
_FP32_KEY = "tflite:fp32"


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    fp32, details = _fp32(ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        shutil.copyfile(fp32, out_dir / ENTRY)
    else:
        quantise(fp32, precision, out_dir / ENTRY, ctx.calibration, ctx.work_dir / "tflite-tools.log")
    (out_dir / ENTRY).chmod(0o644)
    return BuiltVariant(
        target=TARGET,
        precision=precision,
        directory=out_dir,
        entry=ENTRY,
        files=[ENTRY],
        requirements=Requirements(runtime=RUNTIME, min_runtime_version=_installed("ai-edge-litert")),
        details=dict(details),
    )


def open_runner(variant: BuiltVariant, runtime: str, ctx: BuildContext) -> Runner:
    """The variant in ``runtime``: LiteRT in this process, tflite-runtime in its worker process."""
    if runtime == "litert":
        from bundles.runtimes.litert import LiteRtRuntime

        return LiteRtRuntime.load(variant.entry_path, threads=1)
    if runtime == "tflite_runtime":
        return ctx.worker("tflite_runtime").load(TARGET, variant.entry_path)
    raise RuntimeUnavailableError(f"runtime '{runtime}' does not run {TARGET} variants")


def runtime_version(runtime: str, ctx: BuildContext) -> str:
    """The version of ``runtime`` the gates ran on (recorded in the variant's validated runtimes)."""
    if runtime == "tflite_runtime":
        return ctx.worker("tflite_runtime").version
    return _installed("ai-edge-litert")


def _installed(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "0"


# --- export ----------------------------------------------------------------------------------------


def _fp32(ctx: BuildContext) -> tuple[Path, dict[str, Any]]:
    """The source converted once per conversion (fp32), with how its batch was handled."""
    if _FP32_KEY not in ctx.cache:
        module = torch_module(ctx, TARGET)
        path = ctx.work_dir / "tflite-cache" / "fp32.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        output_names = list(ctx.source.predict(example_inputs(ctx.spec, 1)))
        details = _convert(module, ctx.spec, output_names, path, ctx.work_dir / "tflite-tools.log")
        _check_io(path, ctx.spec, output_names, ctx.work_dir / "tflite-tools.log")
        ctx.cache[_FP32_KEY] = (path, details)
    cached: tuple[Path, dict[str, Any]] = ctx.cache[_FP32_KEY]
    return cached


def _named_io(module: Any, input_names: list[str], output_names: list[str]) -> Any:
    """``module`` taking its inputs by the spec's names and returning its outputs by the source's names.

    When every input name is a Python identifier, ``forward`` also carries a signature naming them
    (torch.export needs named parameters to accept dynamic shapes keyed by input name).
    """
    import torch

    class NamedIO(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *args: Any, **inputs: Any) -> dict[str, Any]:
            inputs.update(zip(input_names, args, strict=False))
            result = self.model(*(inputs[name] for name in input_names))
            values = result if isinstance(result, (tuple, list)) else (result,)
            return dict(zip(output_names, values, strict=True))

    if _identifiers(input_names):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [inspect.Parameter(name, kind) for name in ["self", *input_names]]
        NamedIO.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return NamedIO().eval()


def _identifiers(names: list[str]) -> bool:
    return all(name.isidentifier() and not keyword.iskeyword(name) and name != "self" for name in names)


def _convert(module: Any, spec: ModelSpec, output_names: list[str], path: Path, log: Path) -> dict[str, Any]:
    """litert-torch's conversion: a dynamic batch when it can lower one, else a batch of 1."""
    names = [t.name for t in spec.inputs]
    wrapped = _named_io(module, names, output_names)
    dynamic = _dynamic_shapes(spec) if _identifiers(names) else None
    if dynamic is not None:
        try:
            _lower(wrapped, example_inputs(spec, 2), dynamic, path, log)
            return {"batch": "dynamic"}
        except ConversionError as e:
            if any(k != "0" for t in spec.inputs for k in t.dim_ranges):
                raise  # only the batch can fall back to a fixed size; other dynamic dims are the model's contract
            fallback = f"fixed at 1, run row by row for larger batches (a dynamic batch failed: {_cause(e)})"
    elif any(t.dim_ranges for t in spec.inputs):
        fallback = "fixed at 1, run row by row for larger batches (input names that are not identifiers)"
    else:
        fallback = "fixed" if not _batch_is_one(spec) else "fixed at 1"
    _lower(wrapped, example_inputs(spec, 1), None, path, log)
    return {"batch": fallback}


def _cause(error: ConversionError) -> str:
    text = str(error)
    return text.split(": ", 1)[1][:200] if ": " in text else text[:200]


def _lower(wrapped: Any, examples: dict[str, np.ndarray], dynamic: dict[str, Any] | None, path: Path,
           log: Path) -> None:  # fmt: skip
    import torch

    sample = {name: torch.from_numpy(value) for name, value in examples.items()}
    for noisy in ("torchao", "torchao.kernel.intmm", "jax", "absl"):  # CUDA kernels absent, Triton absent: not ours
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with native_output_to(log):
            import litert_torch

            model = litert_torch.convert(wrapped, sample_kwargs=sample, dynamic_shapes=dynamic)
            model.export(str(path))
    except Exception as e:  # litert-torch raises from torch.export, its JAX bridge and the MLIR passes
        raise ConversionError(f"litert-torch cannot lower the model: {_lowering_error(e, log)}") from e


def _lowering_error(error: Exception, log: Path) -> str:
    """The most telling line: the unsupported operator when litert-torch names one, else the error itself."""
    text = f"{type(error).__name__}: {first_line(error)}"
    if "Lowering not found" in text:
        return text
    for line in str(error).splitlines() + log_tail(log, 40).split(" | "):
        telling = "While executing" in line or "Lowering not found" in line or "not supported" in line.lower()
        if telling and line.strip() not in text:
            return f"{text} ({line.strip()[:200]})"
    return text


def _dynamic_shapes(spec: ModelSpec) -> dict[str, Any] | None:
    import torch

    shapes: dict[str, Any] = {}
    for tensor in spec.inputs:
        dims = {int(k): torch.export.Dim(f"{tensor.name}_d{k}", min=low, max=high)
                for k, (low, high) in tensor.dim_ranges.items()}  # fmt: skip
        shapes[tensor.name] = dims or None
    return shapes if any(shapes.values()) else None


def _batch_is_one(spec: ModelSpec) -> bool:
    return all(t.shape and t.shape[0] == 1 for t in spec.inputs)


def _check_io(path: Path, spec: ModelSpec, output_names: list[str], log: Path) -> None:
    """The file's signature takes the spec's inputs in the source's layout and gives the source's outputs."""
    from bundles.runtimes.litert import LiteRtRuntime

    with native_output_to(log):  # the first interpreter of a process announces XNNPACK on stdout
        runtime = LiteRtRuntime.load(path)
    try:
        details = runtime._runner.get_input_details() if runtime._runner is not None else {}
        if set(runtime.input_names) != {t.name for t in spec.inputs} or set(runtime.output_names) != set(output_names):
            raise ConversionError(
                f"the TFLite signature takes {list(runtime.input_names)} and gives {list(runtime.output_names)}, "
                f"the source takes {[t.name for t in spec.inputs]} and gives {output_names}"
            )
        for tensor in spec.inputs:
            shape = [int(d) for d in details[tensor.name]["shape_signature"]]
            expected = list(tensor.shape)
            fits = len(shape) == len(expected) and all(
                e in (-1, s) or s == -1 for e, s in zip(expected, shape, strict=False)
            )
            if not fits:
                raise ConversionError(
                    f"input '{tensor.name}' of the TFLite model has shape {shape}, the source takes {expected} "
                    "(a layout change would make devices feed other tensors)"
                )
    finally:
        runtime.close()


# --- quantisation ----------------------------------------------------------------------------------


def quantise(fp32: Path, precision: str, out_path: Path, calibration: Dataset | None, log: Path) -> None:
    """``fp32`` at ``precision`` with ai-edge-quantizer (see the module docstring's table)."""
    recipe = _recipe(precision)
    try:
        with native_output_to(log):
            from ai_edge_quantizer import quantizer

            engine = quantizer.Quantizer(str(fp32), recipe)
            calibrated = None
            if engine.need_calibration:
                calibrated = engine.calibrate({SIGNATURE: _calibration_samples(calibration, precision)})
            engine.quantize(calibrated).export_model(str(out_path), overwrite=True)
    except GateFailedError:
        raise
    except Exception as e:  # the quantizer raises ValueError/RuntimeError for ops it cannot handle
        raise ConversionError(f"ai-edge-quantizer failed: {type(e).__name__}: {first_line(e)}") from e


def _calibration_samples(calibration: Dataset | None, precision: str) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        raise GateFailedError(f"{precision} needs calibration data: register the model with --calibration")
    rows = min(calibration.rows, CALIBRATION_ROWS)
    return [calibration.take(i, i + 1) for i in range(rows)]


def _recipe(precision: str) -> Any:
    from ai_edge_quantizer import recipe

    recipes = {
        "int4-weight": recipe.weight_only_wi4_afp32,
        "int8-static": recipe.static_wi8_ai8,
        "int8-dynamic": recipe.dynamic_wi8_afp32,
        "int8-weight": recipe.weight_only_wi8_afp32,
        "int8-static-a16": recipe.static_wi8_ai16,
        "fp16": _fp16_recipe,
    }
    if precision not in recipes:
        known = ", ".join(PRECISIONS + EXTRA_PRECISIONS)
        raise ConversionError(f"precision '{precision}' is not one of {known} for {TARGET}")
    return recipes[precision]()


def _fp16_recipe() -> Any:
    """Weights cast to float16, compute and I/O in float32 (ai-edge-quantizer's float casting)."""
    from ai_edge_quantizer import qtyping, recipe, recipe_manager

    manager = recipe_manager.RecipeManager()
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    manager.add_quantization_config(
        regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, op_config=config,
        algorithm_key=recipe.AlgorithmName.FLOAT_CASTING,
    )  # fmt: skip
    return manager.get_quantization_recipe()
