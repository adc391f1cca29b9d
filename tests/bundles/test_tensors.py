"""Tensors as JSON: bit-exact round trips for every manifest dtype; NaN refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bundles.canonical import canonical_json
from bundles.errors import ManifestError
from bundles.manifest import EncodedTensor
from bundles.tensors import decode_tensor, dtype_name, encode_tensor, numpy_dtype

NUMERIC = ["bool", "uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(NUMERIC).flatmap(
        lambda d: hnp.arrays(
            np.dtype(d),
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
            elements={"allow_nan": False, "allow_infinity": False} if d.startswith("float") else None,
        )
    )
)
def test_encode_decode_is_bit_exact_through_canonical_json(array: np.ndarray) -> None:
    encoded = encode_tensor(array)
    through_json = EncodedTensor.from_dict(json.loads(canonical_json(encoded.to_dict())))
    decoded = decode_tensor(through_json)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


def test_strings_round_trip_as_object_arrays() -> None:
    array = np.array([["a", "bé"], ["", "z"]])
    decoded = decode_tensor(encode_tensor(array))
    assert decoded.dtype == object
    assert decoded.tolist() == array.tolist()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_cannot_be_encoded(value: float) -> None:
    with pytest.raises(ManifestError, match="NaN or infinity"):
        encode_tensor(np.array([1.0, value], dtype=np.float32))


def test_unsupported_dtypes_are_named() -> None:
    with pytest.raises(ManifestError, match="complex64"):
        dtype_name(np.dtype(np.complex64))
    with pytest.raises(ManifestError, match="bfloat"):
        numpy_dtype("bfloat")


def test_malformed_values_are_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="malformed"):
        decode_tensor(EncodedTensor(dtype="int8", shape=(2,), data=(1, "x")))
