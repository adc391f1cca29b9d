"""Declarative pre- and post-processing: the manifest's ``preprocess`` / ``postprocess`` steps.

Each :class:`bundles.manifest.Step` names an ``op`` from :data:`bundles.manifest.STEP_OPS` and its
parameters. A step reads the tensor named by ``tensor`` (default: the previous step's output, and
for the first step the first model input (pre) or output (post)) and writes ``output`` (default:
the same name, replacing it). Tensors are batched (batch first), every op is vectorised numpy.

| op | params | effect |
|---|---|---|
| cast | dtype | ``x.astype(dtype)`` |
| reshape | shape (full, -1 allowed) | ``x.reshape(shape)`` |
| scale | factor, offset=0 | ``x * factor + offset`` |
| normalize | mean, std, axis=-1 | ``(x - mean) / std`` along ``axis`` |
| clip | min, max (either optional) | ``np.clip`` |
| softmax | axis=-1 | numerically stable softmax |
| argmax | axis=-1 | index of the maximum (int64) |
| topk | k, axis=-1, scores_output | indices of the k largest (``output``) and their values |
| label_map | labels | integer indices -> label strings |
| transpose | perm (full) | ``np.transpose`` |
| expand_dims | axis | ``np.expand_dims`` |
| tokenizer | file | not supported by array runtimes yet (an :class:`InferenceError`) |

Steps are compiled once (:func:`compile_steps`, at model load) into closures with their parameters
already converted to arrays, so applying them costs only the numpy work. Parameter errors are
:class:`ManifestError` at compile time; array errors at run time are :class:`InputError` before the
model and :class:`InferenceError` after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.errors import InferenceError, InputError, ManifestError
from bundles.manifest import Step
from bundles.tensors import numpy_dtype

StepFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]
STAGES = ("pre", "post")


@dataclass(frozen=True)
class CompiledStep:
    """One step ready to run: read ``source``, write ``targets`` (one or two names)."""

    op: str
    source: str
    targets: tuple[str, ...]
    fn: StepFn


class Pipeline:
    """Compiled steps of one stage; calling it returns a new dict with the steps applied.

    The steps are kept as plain tuples ``(op, source, targets, fn)`` so the per-call loop does no
    attribute lookups: on a batch-1 request the numpy work is a few microseconds and the loop must
    not add as much again.
    """

    def __init__(self, steps: Sequence[CompiledStep], stage: str) -> None:
        self.steps = tuple(steps)
        self.stage = stage
        self._error = InputError if stage == "pre" else InferenceError
        self._plan = tuple((s.op, s.source, s.targets[0] if len(s.targets) == 1 else None, s) for s in self.steps)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(tensors)
        for op, source, single, step in self._plan:
            value = out.get(source)
            if value is None:
                raise self._error(f"{self.stage}-processing step {op} needs tensor '{source}' (absent)")
            try:
                results = step.fn(value)
            except (ValueError, TypeError, IndexError, AttributeError) as e:  # AttributeError: not an array
                raise self._error(f"{self.stage}-processing step {op} on '{source}' failed: {e}") from e
            if single is not None:
                out[single] = results[0]
            else:
                for name, result in zip(step.targets, results, strict=True):
                    out[name] = result
        return out

    def __bool__(self) -> bool:
        return bool(self.steps)


def compile_steps(steps: Sequence[Step], stage: str, default_tensor: str) -> Pipeline:
    """Compile ``steps`` for ``stage`` ("pre" or "post"); ``default_tensor`` feeds the first step."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    compiled: list[CompiledStep] = []
    current = default_tensor
    for index, step in enumerate(steps):
        where = f"{stage}process[{index}] ({step.op})"
        source = _str_param(step.params, "tensor", current, where)
        target = _str_param(step.params, "output", source, where)
        fn = _build(step, where)
        targets: tuple[str, ...] = (target,)
        if step.op == "topk":
            targets = (target, _str_param(step.params, "scores_output", f"{target}_scores", where))
        compiled.append(CompiledStep(step.op, source, targets, fn))
        current = target
    return Pipeline(compiled, stage)


def apply_steps(
    steps: Sequence[Step], tensors: Mapping[str, np.ndarray], stage: str, default_tensor: str | None = None
) -> dict[str, np.ndarray]:
    """Compile and apply ``steps`` in one go (convenient; the Predictor compiles once at load)."""
    default = default_tensor if default_tensor is not None else next(iter(tensors), "")
    return compile_steps(steps, stage, default)(tensors)


# --- parameters ----------------------------------------------------------------------------------


def _str_param(params: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = params.get(key, default)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}.{key}: expected a tensor name, got {value!r}")
    return value


def _int_param(params: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _ints_param(params: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = params.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"{where}.{key}: expected a list of integers, got {value!r}")
    return tuple(value)


def _number_array(params: Mapping[str, Any], key: str, where: str, default: float | None = None) -> np.ndarray:
    value = params.get(key, default)
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{where}.{key}: expected a number or a list of numbers, got {value!r}") from e
    if value is None or arr.ndim > 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ManifestError(f"{where}.{key}: expected a finite number or a flat list of numbers, got {value!r}")
    return arr


# --- ops -----------------------------------------------------------------------------------------


def _build(step: Step, where: str) -> StepFn:
    builder = _BUILDERS.get(step.op)
    if builder is None:
        raise ManifestError(f"{where}: op '{step.op}' is not supported")
    return builder(step.params, where)


def _cast(params: Mapping[str, Any], where: str) -> StepFn:
    dtype_name = params.get("dtype")
    if not isinstance(dtype_name, str):
        raise ManifestError(f"{where}.dtype: expected a dtype name, got {dtype_name!r}")
    dtype = numpy_dtype(dtype_name)
    return lambda x: (x.astype(dtype, copy=False),)


def _reshape(params: Mapping[str, Any], where: str) -> StepFn:
    shape = _ints_param(params, "shape", where)
    return lambda x: (x.reshape(shape),)


def _scale(params: Mapping[str, Any], where: str) -> StepFn:
    factor = _number_array(params, "factor", where)
    offset = _number_array(params, "offset", where, 0.0)
    if not offset.any():
        return lambda x: (x * factor,)
    return lambda x: (x * factor + offset,)


def _along_axis(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a 1-D parameter so it broadcasts along ``axis`` of an ``ndim`` array."""
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def _normalize(params: Mapping[str, Any], where: str) -> StepFn:
    mean = _number_array(params, "mean", where)
    std = _number_array(params, "std", where)
    if np.any(std == 0):
        raise ManifestError(f"{where}.std: must not contain zero")
    axis = _int_param(params, "axis", where, -1)
    inv_std = (1.0 / std).astype(np.float32)
    return lambda x: ((x - _along_axis(mean, axis, x.ndim)) * _along_axis(inv_std, axis, x.ndim),)


def _clip(params: Mapping[str, Any], where: str) -> StepFn:
    lo, hi = params.get("min"), params.get("max")
    if lo is None and hi is None:
        raise ManifestError(f"{where}: needs 'min', 'max' or both")
    for key, value in (("min", lo), ("max", hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ManifestError(f"{where}.{key}: expected a number, got {value!r}")
    return lambda x: (np.clip(x, lo, hi),)


_max, _sum = np.maximum.reduce, np.add.reduce  # the ufuncs themselves: x.max() adds a Python wrapper


def _softmax(params: Mapping[str, Any], where: str) -> StepFn:
    axis = _int_param(params, "axis", where, -1)

    def softmax(x: np.ndarray) -> tuple[np.ndarray, ...]:
        if x.dtype.kind != "f":  # integer logits: the plain form (promotes to float)
            shifted = np.exp(x - x.max(axis=axis, keepdims=True))
            return (shifted / shifted.sum(axis=axis, keepdims=True),)
        if x.size == x.shape[axis]:  # one row (batch 1): whole-array reductions, scalars, no keepdims
            shifted = np.subtract(x, _max(x, axis=None))
            np.exp(shifted, out=shifted)
            shifted /= _sum(shifted, axis=None)
            return (shifted,)
        shifted = np.subtract(x, _max(x, axis=axis, keepdims=True))  # one new array, then in place
        np.exp(shifted, out=shifted)
        shifted /= _sum(shifted, axis=axis, keepdims=True)
        return (shifted,)

    return softmax


def _argmax(params: Mapping[str, Any], where: str) -> StepFn:
    axis = _int_param(params, "axis", where, -1)
    return lambda x: (x.argmax(axis=axis),)  # the method skips numpy's Python wrapper


def _topk(params: Mapping[str, Any], where: str) -> StepFn:
    k = _int_param(params, "k", where)
    axis = _int_param(params, "axis", where, -1)
    if k < 1:
        raise ManifestError(f"{where}.k: must be at least 1, got {k}")

    def topk(x: np.ndarray) -> tuple[np.ndarray, ...]:
        moved = np.moveaxis(x, axis, -1)
        if moved.shape[-1] < k:
            raise ValueError(f"k={k} exceeds the axis length {moved.shape[-1]}")
        order = np.argsort(-moved, axis=-1, kind="stable")[..., :k]
        values = np.take_along_axis(moved, order, axis=-1)
        return np.moveaxis(order, -1, axis), np.moveaxis(values, -1, axis)

    return topk


def _label_map(params: Mapping[str, Any], where: str) -> StepFn:
    labels = params.get("labels")
    if not isinstance(labels, list) or not labels:
        raise ManifestError(f"{where}.labels: expected a non-empty list of labels")
    table = np.asarray([str(label) for label in labels], dtype=object)

    def label_map(x: np.ndarray) -> tuple[np.ndarray, ...]:
        if x.dtype.kind not in "iu":
            raise TypeError(f"label_map needs integer indices, got {x.dtype}")
        return (table.take(x, mode="raise"),)  # raises IndexError past the end; indices come from argmax/topk

    return label_map


def _transpose(params: Mapping[str, Any], where: str) -> StepFn:
    perm = _ints_param(params, "perm", where)
    return lambda x: (np.transpose(x, perm),)


def _expand_dims(params: Mapping[str, Any], where: str) -> StepFn:
    axis = _int_param(params, "axis", where)
    return lambda x: (np.expand_dims(x, axis),)


def _tokenizer(params: Mapping[str, Any], where: str) -> StepFn:
    source = params.get("file", "?")

    def unsupported(_x: np.ndarray) -> tuple[np.ndarray, ...]:
        raise InferenceError(f"{where}: tokenizer '{source}' is not supported for this runtime yet")

    return unsupported


_BUILDERS: dict[str, Callable[[Mapping[str, Any], str], StepFn]] = {
    "cast": _cast,
    "reshape": _reshape,
    "scale": _scale,
    "normalize": _normalize,
    "clip": _clip,
    "softmax": _softmax,
    "argmax": _argmax,
    "topk": _topk,
    "label_map": _label_map,
    "transpose": _transpose,
    "expand_dims": _expand_dims,
    "tokenizer": _tokenizer,
}

__all__ = ["STAGES", "CompiledStep", "Pipeline", "apply_steps", "compile_steps"]
