"""The one OIP codec: what a client encodes, a server decodes (and back), for every datatype, JSON or binary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bundles import oip
from bundles.errors import InputError

NUMERIC = [np.dtype(name) for key, name in oip.DATATYPES.items() if key != "BYTES"]


def _finite_arrays(dtype: np.dtype) -> st.SearchStrategy[np.ndarray]:
    elements = {"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=elements)


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    if draw(st.booleans()):
        texts = draw(st.lists(st.text(max_size=8), min_size=1, max_size=6))
        out = np.empty(len(texts), dtype=object)
        out[:] = texts
        return out
    array: np.ndarray = draw(_finite_arrays(draw(st.sampled_from(NUMERIC))))
    return array


def assert_same(got: np.ndarray, sent: np.ndarray) -> None:
    assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
    if sent.dtype == object:
        assert list(got) == list(sent)
    else:
        assert got.tobytes() == sent.tobytes()


@settings(max_examples=150, deadline=None)
@given(values=st.lists(tensors(), min_size=1, max_size=3), binary=st.booleans())
def test_a_request_the_client_encodes_is_decoded_by_the_server_bit_for_bit(
    values: list[np.ndarray], binary: bool
) -> None:
    inputs = {f"in{i}": value for i, value in enumerate(values)}
    body, headers = oip.encode_request(inputs, binary)
    header, payload = oip.split_body(body, headers.get("Inference-Header-Content-Length"))
    decoded = oip.decode_inputs(oip.parse_header(header), payload)
    for name, value in inputs.items():
        assert_same(decoded[name], value)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(tensors(), min_size=1, max_size=3), binary=st.booleans())
def test_an_answer_the_server_encodes_is_decoded_by_the_client(values: list[np.ndarray], binary: bool) -> None:
    outputs = {f"out{i}": value for i, value in enumerate(values)}
    tensors_json, raw = oip.encode_outputs(outputs, {}, binary)
    decoded = oip.decode_answer(json.loads(json.dumps({"outputs": tensors_json})), raw)
    for name, value in outputs.items():
        assert_same(decoded[name], value)


def test_non_finite_values_are_refused_in_inputs_unless_allowed_and_kept_in_answers() -> None:
    x = np.array([[np.nan, np.inf]], dtype=np.float32)
    body, _ = oip.encode_request({"x": x}, binary=False)
    header = oip.parse_header(body, allow_constants=True)
    with pytest.raises(InputError, match="input 'x': NaN or infinite"):
        oip.decode_inputs(header, b"")
    assert np.isnan(oip.decode_inputs(header, b"", allow_non_finite={"x"})["x"][0, 0])
    with pytest.raises(InputError, match="not valid JSON"):
        oip.parse_header(body)  # a strict server refuses the NaN literal itself
    tensors_json, raw = oip.encode_outputs({"y": x}, {}, True)
    assert np.isinf(oip.decode_answer({"outputs": tensors_json}, raw)["y"][0, 1])


@pytest.mark.parametrize(
    ("answer", "payload", "message"),
    [
        ({}, b"", "no 'outputs' list"),
        ({"outputs": [{"name": "y", "shape": [2], "datatype": "FP32", "data": [1.0]}]}, b"", "output 'y': data"),
        ({"outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
         b"\0\0", "output 'y': the binary body is shorter"),
        ({"outputs": [{"name": "y", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}, b"", "output 'y': datatype"),
    ],
)  # fmt: skip
def test_a_malformed_answer_is_refused_naming_the_output(answer: dict, payload: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        oip.decode_answer(answer, payload)
