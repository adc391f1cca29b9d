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


def _standard_header(raw: bytes, allow_constants: bool) -> object:
    """What the header parser accepted before orjson: the standard library, constants refused unless allowed."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        parsed = json.loads(raw, parse_constant=None if allow_constants else refuse)
    except (ValueError, RecursionError):
        return "refused"
    return parsed if isinstance(parsed, dict) else "refused"


HEADERS = [
    b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0.1, 2]}]}',
    b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b'{"a": 123456789012345678901234567890}',
    '{"a": "\u00e9"}'.encode("utf-16"), '{"a": 1}'.encode("utf-32-le"), b'{"a": "\xff"}', b'{"a": 1, "a": 2}',
    b"[1, 2]", b"", b"  ", b"{", b'{"a": 1} x', b"[" * 3000 + b"]" * 3000, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
]  # fmt: skip


@pytest.mark.parametrize("allow_constants", [False, True])
@pytest.mark.parametrize("raw", HEADERS)
def test_the_header_parser_accepts_exactly_what_the_standard_library_accepts(raw: bytes, allow_constants: bool) -> None:
    expected = _standard_header(raw or b"{}", allow_constants)
    try:
        got: object = oip.parse_header(raw, allow_constants)
    except InputError:
        got = "refused"
    if raw == b'{"a": 123456789012345678901234567890}':  # orjson reads integers past 64 bits as floats:
        assert got == {"a": 1.2345678901234568e29}  # no tensor takes either (the next test)
        return
    assert repr(got) == repr(expected)  # repr: NaN == NaN, and 1 is not 1.0


@pytest.mark.parametrize("datatype", ["INT64", "INT8", "UINT64", "BOOL"])
@pytest.mark.parametrize("value", [b"1.5", b"1e30", b"123456789012345678901234567890", b"-1e300", b"300"])
def test_an_integer_tensor_refuses_numbers_it_cannot_hold_exactly(datatype: str, value: bytes) -> None:
    raw = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "%s", "data": [1, %s]}]}' % (datatype.encode(), value)
    header = oip.parse_header(raw)
    if value == b"300" and datatype in ("INT64", "UINT64"):
        assert oip.decode_inputs(header, b"")["x"].tolist() == [1, 300]
        return
    with pytest.raises(InputError, match="input 'x': data does not match"):
        oip.decode_inputs(header, b"")


def test_integral_floats_and_json_booleans_are_taken_as_the_integers_they_are() -> None:
    raw = b'{"inputs": [{"name": "i", "shape": [2], "datatype": "INT32", "data": [1.0, -2]},'
    raw += b' {"name": "b", "shape": [3], "datatype": "BOOL", "data": [true, 0, 1]}]}'
    decoded = oip.decode_inputs(oip.parse_header(raw), b"")
    assert decoded["i"].tolist() == [1, -2] and decoded["b"].tolist() == [True, False, True]


@settings(max_examples=150, deadline=None)
@given(values=st.lists(tensors(), min_size=1, max_size=3), request_id=st.text(max_size=12))
def test_an_answer_header_reads_back_as_the_standard_library_would_write_it(
    values: list[np.ndarray], request_id: str
) -> None:
    tensors_json, _ = oip.encode_outputs({f"out{i}": v for i, v in enumerate(values)}, {}, False)
    answer = {"model_name": "m", "model_version": "1", "id": request_id, "outputs": tensors_json}
    assert json.loads(oip.dumps_answer(answer)) == json.loads(json.dumps(answer))


def test_a_model_answering_nan_or_infinity_is_written_with_the_literals_clients_read() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    tensors_json, _ = oip.encode_outputs({"y": y}, {}, False)
    body = oip.dumps_answer({"outputs": tensors_json})
    assert b"NaN" in body and b"-Infinity" in body and b"null" not in body
    assert oip.decode_answer(json.loads(body), b"")["y"].tobytes() == y.tobytes()
