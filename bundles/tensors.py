"""Tensors in JSON: numpy arrays <-> :class:`bundles.manifest.EncodedTensor`.

Golden cases, sampled prediction logs and the cloud endpoint carry tensors as plain JSON (dtype,
shape, row-major values) so that they can be hashed and signed as canonical JSON. Floats go through
Python floats, whose shortest round-trip ``repr`` reproduces every float16/32/64 value exactly, so
``decode_tensor(encode_tensor(a))`` is bit-identical to ``a``. NaN and infinity have no JSON form
and are refused at encoding time rather than producing bytes no reader agrees on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bundles.errors import InputError, ManifestError
from bundles.manifest import DTYPES, EncodedTensor, TensorSpec

_STRING_KINDS = ("U", "S", "O")


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The manifest dtype name (one of :data:`DTYPES`) of a numpy dtype."""
    if dtype.kind in _STRING_KINDS:
        return "string"
    name = str(dtype.name)
    if name not in DTYPES:
        raise ManifestError(f"numpy dtype '{name}' has no manifest equivalent (known: {', '.join(DTYPES)})")
    return name


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a manifest dtype name; strings map to ``object`` (what ONNX Runtime takes)."""
    if name not in DTYPES:
        raise ManifestError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return np.dtype(object) if name == "string" else np.dtype(name)


def conform(value: Any, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """``value`` as the model's declared ``dtype``, when that keeps its kind of meaning.

    The one conversion of a request's inputs: the Predictor runs it on what it feeds the model, and
    the device's cloud fallback on what it forwards, so the cloud is sent what the device would run
    (a JSON number list decodes as float64 for a float32 model; the cloud checks datatypes exactly).
    Allowed: a cast within a kind or up it (float64 -> float32 or float16, int32 -> int64, int ->
    float) and text to ``object`` strings; refused (:class:`InputError`): float -> int, anything -> bool...
    """
    arr = np.asarray(value)
    if arr.dtype == dtype:
        return arr
    if dtype.kind == "O" and arr.dtype.kind in "US":
        return arr.astype(object)
    if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise InputError(f"input '{name}': dtype {arr.dtype} cannot be used as {dtype}")
    return arr.astype(dtype)


def input_dtypes(specs: Iterable[TensorSpec]) -> dict[str, np.dtype[Any]]:
    """Input name -> the numpy dtype :func:`conform` converts it to (a manifest's ``inputs``)."""
    return {spec.name: numpy_dtype(spec.dtype) for spec in specs}


def conform_inputs(inputs: Mapping[str, Any], dtypes: Mapping[str, np.dtype[Any]]) -> dict[str, np.ndarray]:
    """Every input :func:`conform`-ed to its dtype in ``dtypes``; one it does not name is passed as it is."""
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        dtype = dtypes.get(name)
        out[name] = np.asarray(value) if dtype is None else conform(value, dtype, name)
    return out


def encode_tensor(array: Any) -> EncodedTensor:
    """Encode an array (or anything ``np.asarray`` takes) as JSON-ready :class:`EncodedTensor`."""
    arr = np.asarray(array)
    name = dtype_name(arr.dtype)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ManifestError("cannot encode a tensor holding NaN or infinity as JSON")
    values: list[Any] = [str(v) for v in arr.reshape(-1)] if name == "string" else arr.reshape(-1).tolist()
    return EncodedTensor(dtype=name, shape=tuple(int(d) for d in arr.shape), data=tuple(values))


def decode_tensor(tensor: EncodedTensor) -> np.ndarray:
    """Decode an :class:`EncodedTensor` into a numpy array of its declared dtype and shape."""
    dtype = numpy_dtype(tensor.dtype)
    try:
        arr = np.array(tensor.data, dtype=dtype)
        return arr.reshape(tensor.shape)
    except (ValueError, TypeError, OverflowError) as e:
        raise ManifestError(f"tensor of dtype {tensor.dtype} and shape {list(tensor.shape)} is malformed: {e}") from e


__all__ = ["conform", "conform_inputs", "decode_tensor", "dtype_name", "encode_tensor", "input_dtypes", "numpy_dtype"]
