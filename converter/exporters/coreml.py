"""The ``coreml`` target: Core ML ML programs (``.mlpackage``) from PyTorch sources, with coremltools.

Export. ``torch.export`` of the source (its dynamic dimensions declared), then
``run_decompositions({})`` (coremltools converts only the ATEN dialect), then ``ct.convert`` as an
ML program for ``macOS13`` (= iOS16, ML program spec 7). coremltools 9 cannot convert everything
torch 2.13 exports (the digits CNN's ``max_pool2d`` arrives with two inputs and fails), so a
failed export route falls back to ``torch.jit.trace``; ``details.route`` names the route taken and
why. Inputs and outputs keep the source's names, shapes (dynamic dimensions as ``RangeDim``) and
float32 type: fp16 precision with an iOS16+ target would otherwise turn the input to FLOAT16, and
``ct.TensorType`` objects are built afresh for every conversion (``ct.convert`` mutates them).

Precisions: ``fp32`` (compute precision FLOAT32), ``fp16`` (FLOAT16), ``int8-weight``
(``coremltools.optimize.coreml.linear_quantize_weights``, symmetric per channel, weights of at least
2048 elements) and ``int4-palette`` (``palettize_weights``, 4-bit uniform look-up tables, same
threshold), the compressed ones made from the fp32 program.

Reproducible bytes: coremltools stamps the conversion date into the model's metadata, writes the
protobuf map in hash order and names the package's items with random UUIDs; the date is dropped,
the spec re-serialised deterministically and the item identifiers derived from their paths.

Validation. Core ML executes only on macOS. Elsewhere :func:`check_structure` validates what can
be validated without executing (the variant's status is then ``structural``, "structurally valid,
not executed on this host"): an ML program of the expected spec version, inputs and outputs against
the model's schema, the compression operators actually present (``constexpr_affine_dequantize``,
``constexpr_lut_to_dense``), the weight file's size, and the dequantised weights against the
source's weights (each within one quantisation step of its bit width). On macOS the same command
executes the variants in Core ML and runs the full numeric gates.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError, RuntimeUnavailableError
from bundles.manifest import Requirements
from converter.build_context import BuildContext
from converter.exporters import BuiltVariant, Runner, example_inputs, torch_module
from converter.onnx_tools import first_line
from converter.quiet import native_output_to
from converter.spec import ModelSpec

TARGET = "coreml"
RUNTIME = "coreml"
RUNTIMES = ("coreml",)
VALIDATED_RUNTIMES_BIND = True
PRECISIONS = ("int4-palette", "int8-weight", "fp16", "fp32")
EXTRA_PRECISIONS: tuple[str, ...] = ()
ENTRY = "model.mlpackage"
DEPLOYMENT_TARGET = "macOS13"
MIN_COREMLTOOLS = "7.0"
"""The first coremltools that loads ML programs of spec 7 with constexpr compression operators."""
WEIGHT_THRESHOLD = 2048
COMPRESSION_OPS = {"int8-weight": "constexpr_affine_dequantize", "int4-palette": "constexpr_lut_to_dense"}
_WEIGHT_STEP = {"fp32": 1e-6, "fp16": 2.0**-10, "int8-weight": 1 / 127, "int4-palette": 2 / 15}
"""Largest dequantised-weight error allowed, relative to the layer's largest |weight|: one step of the format."""
_FLOAT_TYPES = {"float32": "FLOAT32", "float16": "FLOAT16", "float64": "DOUBLE", "int32": "INT32", "int64": "INT32"}


def build(ctx: BuildContext, precision: str, out_dir: Path) -> BuiltVariant:
    model, details = _model(ctx, precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    with native_output_to(ctx.work_dir / "coreml-tools.log"):
        model.save(str(out_dir / ENTRY))
    normalise_package(out_dir / ENTRY)
    ctx.cache[f"coreml:program:{precision}"] = model._mil_program
    files = sorted(str(p.relative_to(out_dir)) for p in (out_dir / ENTRY).rglob("*") if p.is_file())
    requirements = Requirements(runtime=RUNTIME, min_runtime_version=MIN_COREMLTOOLS, os=("darwin",),
                                deployment_target=DEPLOYMENT_TARGET)  # fmt: skip
    return BuiltVariant(target=TARGET, precision=precision, directory=out_dir, entry=ENTRY, files=files,
                        requirements=requirements, details=dict(details))  # fmt: skip


def open_runner(variant: BuiltVariant, runtime: str, ctx: BuildContext) -> Runner:  # noqa: ARG001
    """Core ML on macOS; elsewhere RuntimeUnavailableError with the reason (the variant is then structural)."""
    from bundles.runtimes.coreml import CoreMlRuntime

    if runtime != RUNTIME:
        raise RuntimeUnavailableError(f"runtime '{runtime}' does not run {TARGET} variants")
    return CoreMlRuntime.load(variant.entry_path)


def runtime_version(runtime: str, ctx: BuildContext) -> str:  # noqa: ARG001
    """coremltools' version on macOS; RuntimeUnavailableError elsewhere (the variants are then structural)."""
    from importlib import metadata

    from bundles.runtimes.coreml import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeUnavailableError(reason)
    return metadata.version("coremltools")


# --- conversion ------------------------------------------------------------------------------------


def _model(ctx: BuildContext, precision: str) -> tuple[Any, dict[str, Any]]:
    """The in-memory MLModel at ``precision`` (the fp32 program converted once, the others from it)."""
    if precision in ("fp32", "fp16"):
        key = f"coreml:model:{precision}"
        if key not in ctx.cache:
            ctx.cache[key] = _convert(ctx, precision)
        cached: tuple[Any, dict[str, Any]] = ctx.cache[key]
        return cached
    fp32, details = _model(ctx, "fp32")
    if precision not in COMPRESSION_OPS:
        raise ConversionError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)} for {TARGET}")
    return _compress(fp32, precision, ctx.work_dir / "coreml-tools.log"), details


def _quiet_coremltools() -> None:
    """coremltools logs its import checks (torch and scikit-learn versions, the macOS-only proxies) and every
    op a failed route could not convert: expected here, and the route taken is recorded in the details."""
    logging.getLogger("coremltools").setLevel(logging.CRITICAL)


def _convert(ctx: BuildContext, precision: str) -> tuple[Any, dict[str, Any]]:
    _quiet_coremltools()
    import coremltools as ct

    module = torch_module(ctx, TARGET)
    output_names = list(ctx.source.predict(example_inputs(ctx.spec, 1)))
    log = ctx.work_dir / "coreml-tools.log"
    compute = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    details: dict[str, Any] = {"deployment_target": DEPLOYMENT_TARGET}
    try:
        program = _exported(module, ctx.spec, log)
        details["route"] = "torch.export + run_decompositions"
        return _ct_convert(program, ctx.spec, output_names, compute, log), details
    except ConversionError as e:
        details["route"] = f"torch.jit.trace (torch.export route failed: {str(e)[:200]})"
    traced = _traced(module, ctx.spec, log)
    return _ct_convert(traced, ctx.spec, output_names, compute, log), details


def _exported(module: Any, spec: ModelSpec, log: Path) -> Any:
    import torch

    from converter.sources.torch import dynamic_shapes

    examples = tuple(torch.from_numpy(a) for a in example_inputs(spec, 2).values())
    try:
        with native_output_to(log):
            program = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes(spec))
            return program.run_decompositions({})
    except Exception as e:
        raise ConversionError(f"torch.export failed: {type(e).__name__}: {first_line(e)}") from e


def _traced(module: Any, spec: ModelSpec, log: Path) -> Any:
    import torch

    examples = tuple(torch.from_numpy(a) for a in example_inputs(spec, 2).values())
    try:
        with native_output_to(log), torch.no_grad():
            return torch.jit.trace(module, examples)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise ConversionError(f"torch.jit.trace failed: {type(e).__name__}: {first_line(e)}") from e


def _ct_convert(program: Any, spec: ModelSpec, output_names: list[str], compute: Any, log: Path) -> Any:
    import coremltools as ct

    inputs = [_tensor_type(t) for t in spec.inputs]  # fresh objects: ct.convert mutates them
    outputs = [ct.TensorType(name=name) for name in output_names]
    try:
        with native_output_to(log):
            return ct.convert(program, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=ct.target.macOS13, compute_precision=compute)  # fmt: skip
    except Exception as e:  # coremltools raises NotImplementedError/ValueError/RuntimeError per op
        raise ConversionError(f"coremltools cannot convert the model: {type(e).__name__}: {first_line(e)}") from e


def _tensor_type(tensor: Any) -> Any:
    import coremltools as ct

    from bundles.tensors import numpy_dtype

    dims: list[Any] = []
    for index, dim in enumerate(tensor.shape):
        low, high = tensor.dim_ranges.get(str(index), (1, 1))
        dims.append(dim if dim != -1 else ct.RangeDim(lower_bound=low, upper_bound=high, default=low))
    dtype = numpy_dtype(tensor.dtype)
    dtype = np.dtype(np.int32) if dtype == np.int64 else dtype  # Core ML has no int64 tensors
    return ct.TensorType(name=tensor.name, shape=ct.Shape(shape=tuple(dims)), dtype=dtype)


def _compress(fp32: Any, precision: str, log: Path) -> Any:
    import coremltools.optimize.coreml as cto

    try:
        with native_output_to(log):
            if precision == "int8-weight":
                config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=WEIGHT_THRESHOLD)
                return cto.linear_quantize_weights(fp32, cto.OptimizationConfig(global_config=config))
            config = cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=WEIGHT_THRESHOLD)
            return cto.palettize_weights(fp32, cto.OptimizationConfig(global_config=config))
    except Exception as e:
        raise ConversionError(f"coremltools.optimize failed ({precision}): {type(e).__name__}: {first_line(e)}") from e


def normalise_package(package: Path) -> None:
    """Same model, same bytes: no conversion date, a deterministic spec, item ids derived from paths."""
    from coremltools.proto import Model_pb2

    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgefleet:" + item["path"]))
               for old, item in manifest["itemInfoEntries"].items()}  # fmt: skip
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed.get(manifest["rootModelIdentifier"], manifest["rootModelIdentifier"])
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


# --- structural validation -------------------------------------------------------------------------


def check_structure(variant: BuiltVariant, ctx: BuildContext, parent: dict[str, Any] | None) -> tuple[
        dict[str, Any], list[str]]:  # fmt: skip
    """What can be validated without executing the variant: (metrics, reasons to refuse it)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(variant.entry_path))
    program = ctx.cache.get(f"coreml:program:{variant.precision}")
    ops = _op_histogram(program)
    weights = _weights_bytes(variant.entry_path)
    metrics: dict[str, Any] = {
        "structural": True, "size_bytes": variant.size_bytes, "spec_version": int(spec.specificationVersion),
        "model_type": spec.WhichOneof("Type"), "deployment_target": DEPLOYMENT_TARGET, "ops": ops,
        "weights_bytes": weights,
    }  # fmt: skip
    if parent is not None and parent.get("weights_bytes"):
        metrics["weights_ratio_to_fp32"] = weights / parent["weights_bytes"]
    reasons = _program_reasons(spec, variant.precision, ops) + _io_reasons(spec, ctx)
    errors = weight_errors(program, torch_module(ctx, TARGET), variant.precision)
    metrics["weight_errors"] = errors
    reasons += [f"weight {name}: dequantised error {e['max_abs_error']:.3g} > one step of its format "
                f"({e['allowed']:.3g})" for name, e in errors.items() if e["max_abs_error"] > e["allowed"]]  # fmt: skip
    if not errors:
        reasons.append("no weight of the source was found in the Core ML program to compare with")
    return metrics, reasons


def _op_histogram(program: Any) -> dict[str, int]:
    if program is None:
        return {}
    counts = Counter(op.op_type for function in program.functions.values() for op in function.operations)
    return dict(sorted(counts.items()))


def _weights_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in (package / "Data" / "com.apple.CoreML" / "weights").rglob("*") if p.is_file())


def _program_reasons(spec: Any, precision: str, ops: dict[str, int]) -> list[str]:
    reasons = []
    if spec.WhichOneof("Type") != "mlProgram":
        reasons.append(f"the package holds a {spec.WhichOneof('Type')}, not an ML program")
    if int(spec.specificationVersion) < 7:
        reasons.append(f"specification version {spec.specificationVersion} is below 7 ({DEPLOYMENT_TARGET})")
    wanted = COMPRESSION_OPS.get(precision)
    if wanted is not None and not ops.get(wanted):
        reasons.append(f"no {wanted} operator in the program: {precision} compressed nothing")
    return reasons


def _io_reasons(spec: Any, ctx: BuildContext) -> list[str]:
    """The package's inputs and outputs against the model's schema (names, types, shapes, ranges)."""
    reasons = []
    declared = {i.name: i for i in spec.description.input}
    for tensor in ctx.spec.inputs:
        found = declared.get(tensor.name)
        if found is None:
            reasons.append(f"input '{tensor.name}' is missing (the package takes {sorted(declared)})")
            continue
        reasons.extend(_array_reasons(f"input '{tensor.name}'", found.type.multiArrayType, tensor))
    outputs = {o.name for o in spec.description.output}
    expected = set(ctx.source.predict(example_inputs(ctx.spec, 1)))
    if outputs != expected:
        reasons.append(f"outputs {sorted(outputs)} differ from the source's {sorted(expected)}")
    return reasons


def _array_reasons(label: str, array: Any, tensor: Any) -> list[str]:
    from coremltools.proto import FeatureTypes_pb2

    dtype = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    reasons = []
    if dtype != _FLOAT_TYPES.get(tensor.dtype, tensor.dtype.upper()):
        reasons.append(f"{label} is {dtype}, the source takes {tensor.dtype}")
    shape = [int(d) for d in array.shape]
    ranges = [(int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges]
    if len(shape) != len(tensor.shape):
        return [*reasons, f"{label} has rank {len(shape)}, the source {len(tensor.shape)}"]
    for index, dim in enumerate(tensor.shape):
        low, high = tensor.dim_ranges.get(str(index), (dim, dim)) if dim == -1 else (dim, dim)
        got = ranges[index] if ranges else (shape[index], shape[index])
        if dim != -1 and got != (dim, dim) or dim == -1 and not (got[0] <= low and (got[1] >= high or got[1] < 0)):
            reasons.append(f"{label} dimension {index} takes {got}, the source {low}..{high}")
    return reasons


def weight_errors(program: Any, module: Any, precision: str) -> dict[str, dict[str, float]]:
    """Per source weight (2-D and more): the largest |dequantised - source| and what one step allows."""
    if program is None:
        return {}
    values = _program_weights(program)
    out: dict[str, dict[str, float]] = {}
    for name, parameter in module.state_dict().items():
        source = parameter.detach().cpu().numpy().astype(np.float64)
        if source.ndim < 2:
            continue
        found = _match(name, source.shape, values)
        if found is None:
            continue
        scale = float(np.max(np.abs(source))) or 1.0
        error = float(np.max(np.abs(found - source)))
        out[name] = {"max_abs_error": error, "allowed": scale * _WEIGHT_STEP[precision] + 1e-12}
    return out


def _program_weights(program: Any) -> dict[str, np.ndarray]:
    """Every constant and decompressed (constexpr) tensor of the program, by operation name."""
    found = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "const" and op.outputs and op.outputs[0].val is not None:
                value = np.asarray(op.outputs[0].val)
            elif op.op_type.startswith("constexpr_"):
                value = np.asarray(op.materialized_val_inference())
            else:
                continue
            if value.ndim >= 2:
                found[op.name] = value.astype(np.float64)
    return found


def _match(name: str, shape: tuple[int, ...], values: dict[str, np.ndarray]) -> np.ndarray | None:
    """The program tensor standing for the source weight ``name`` (named after it, same shape)."""
    key = name.replace(".", "_")
    candidates = [op for op, value in values.items() if key in op and value.shape == shape]
    return values[min(candidates, key=len)] if candidates else None
