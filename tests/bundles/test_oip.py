"""The one OIP codec: what a client encodes, a server decodes (and back), for every datatype, JSON or binary."""

from __future__ import annotations

import json
from typing import Any

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


def _outcome(result: Any) -> Any:
    if isinstance(result, InputError):
        return ("error", str(result))
    return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in result.items()}  # NaN compares by its bits


def _alone(header: dict[str, Any], payload: bytes, allowed: Any = ()) -> Any:
    try:
        return _outcome(oip.decode_inputs(header, payload, allowed))
    except InputError as e:
        return ("error", str(e))


def _json_input(data: Any, shape: Any = None, name: Any = "x", datatype: Any = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": [1, len(data)] if shape is None else shape, "datatype": datatype,
                        "data": data}]}  # fmt: skip


def test_decoding_many_requests_gives_each_exactly_what_it_would_get_alone() -> None:
    x = np.arange(4, dtype=np.float32)
    binary_header = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 16}}]}  # fmt: skip
    requests: list[tuple[dict[str, Any], bytes]] = [
        (_json_input([0.5, 1.0, -2.0, 3.0]), b""),
        (_json_input([1, 2, 3, 4], shape=[2, 2]), b""),  # other shape, same elements: a row of its own shape
        (_json_input([0.5, float("nan"), 0.0, 1.0]), b""),  # NaN: its own error
        (_json_input([1e39, 0.0, 0.0, 1.0]), b""),  # too large for float32: its own error
        (_json_input([0.5, 1.0, 2.0]), b""),  # another length: alone
        (_json_input([0.5, 1.0, 2.0, 3.0], shape=[1, 3]), b""),  # shape and data disagree: its own error
        (_json_input([[0.5, 1.0], [2.0, 3.0]], shape=[2, 2]), b""),  # nested data: alone
        (_json_input([0.5, 1.0, 2.0, 3.0], datatype=["FP32"]), b""),  # an unhashable datatype: its own error
        (_json_input([0.5, 1.0, 2.0, 3.0], name=7), b""),  # a name that is not a string: its own error
        (_json_input([0.5, "x", 2.0, 3.0]), b""),  # a string among the numbers
        (binary_header, x.tobytes()),
        (_json_input([1.0, 2.0, 3.0, 4.0], datatype="INT64"), b""),
        (_json_input([9.0, 8.0, 7.0, 6.0]), b""),
    ]
    many = oip.decode_inputs_many(requests)
    assert [_outcome(r) for r in many] == [_alone(h, p) for h, p in requests]
    assert sum(isinstance(r, InputError) for r in many) == 6, [_outcome(r) for r in many]


def test_inputs_allowed_non_finite_values_keep_them_when_decoded_together() -> None:
    requests = [(_json_input([0.5, float("nan"), float("inf"), 1.0]), b""), (_json_input([1.0, 2.0, 3.0, 4.0]), b"")]
    many = oip.decode_inputs_many(requests, allow_non_finite={"x"})
    assert [_outcome(r) for r in many] == [_alone(h, p, {"x"}) for h, p in requests]
    assert not isinstance(many[0], InputError) and np.isnan(many[0]["x"][0, 1])


def test_an_integer_input_decoded_together_refuses_a_value_it_cannot_hold_exactly_in_its_own_request() -> None:
    requests = [
        (_json_input([1, 2, 3, 4], datatype="INT32"), b""),
        (_json_input([1, 2.5, 3, 4], datatype="INT32"), b""),
    ]
    many = oip.decode_inputs_many(requests)
    assert [_outcome(r) for r in many] == [_alone(h, p) for h, p in requests]
    assert not isinstance(many[0], InputError) and isinstance(many[1], InputError)


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    n = draw(st.sampled_from([3, 4]))
    numbers = st.one_of(st.floats(width=64), st.integers(-(2**70), 2**70), st.booleans())
    data = draw(st.lists(numbers, min_size=n, max_size=n))
    shape = draw(st.sampled_from([[1, n], [n], [2, 2], [1, 3]]))
    return _json_input(data, shape=shape, datatype=draw(st.sampled_from(["FP32", "FP64", "INT32", "FP16"]))), b""


def _answers_one_by_one(head: dict[str, Any], outputs_list: list[dict[str, Any]], tail: dict[str, Any]) -> list[bytes]:
    return [oip.dumps_answer({**head, "outputs": oip.encode_outputs(o, {}, False)[0], **tail}) for o in outputs_list]


def _labels(*texts: Any) -> np.ndarray:
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out


HEAD = {"model_name": "m", "model_version": "3"}
TAIL = {"parameters": {"source": "local", "latency_ms": 0.25, "postprocessed": True}}


def test_answers_written_together_are_byte_for_byte_the_answers_written_one_by_one() -> None:
    rng = np.random.default_rng(2)
    alike = [{"scores": rng.random((1, 3), dtype=np.float32), "label": _labels("cat"), "index": np.array([2])}
             for _ in range(4)]  # fmt: skip
    odd = [
        {**alike[0], "scores": np.array([[np.nan, 1.0, np.inf]], np.float32)},  # NaN is written as Python writes it
        {**alike[1], "label": _labels(b"\xc3\xa9t\xc3\xa9")},  # bytes labels are decoded text
        {**alike[2], "scores": rng.random((2, 3), dtype=np.float32)},  # two rows
        {"index": np.array([1]), "scores": rng.random((1, 3), dtype=np.float32)},  # other names, other order
        {**alike[3], "scores": rng.random((1, 3)).astype(np.float64)},  # another dtype
        {**alike[0], "extra": np.zeros((1, 2, 2), np.float32)},  # three dimensions
        {**alike[1], "empty": np.zeros((1, 0), np.float32)},  # no values
    ]
    for outputs_list in (alike, alike + odd[:1], alike + odd[1:2], alike + odd[2:3], alike + odd[3:4], alike + odd[4:5],
                         [*odd[5:6], *odd[5:6]], [odd[6]] * 3, [alike[0]]):  # fmt: skip
        assert oip.encode_answers_many(HEAD, outputs_list, TAIL) == _answers_one_by_one(HEAD, outputs_list, TAIL)
    assert oip.encode_answers_many({}, alike, {}) == _answers_one_by_one({}, alike, {})


@given(st.lists(_finite_arrays(np.dtype("float32")).filter(lambda a: a.ndim in (1, 2) and a.shape[0] == 1),
                min_size=1, max_size=5))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_any_one_row_outputs_written_together_match_one_by_one(arrays: list[np.ndarray]) -> None:
    outputs_list = [{"y": a, "label": _labels(str(i))} for i, a in enumerate(arrays)]
    assert oip.encode_answers_many(HEAD, outputs_list, TAIL) == _answers_one_by_one(HEAD, outputs_list, TAIL)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    datatype = draw(st.sampled_from(["FP32", "FP16", "INT64", "UINT8"]))
    dtype = np.dtype(oip.DATATYPES[datatype])
    n = draw(st.sampled_from([3, 4]))
    elements = None if dtype.kind != "f" else st.floats(width=16, allow_nan=True, allow_infinity=True)
    array = draw(hnp.arrays(dtype, (n,), elements=elements))
    payload = array.tobytes()
    payload += draw(st.sampled_from([b"", b"", b"\x00"]))  # a byte that no input claims, now and then
    size = draw(st.sampled_from([len(payload), len(payload), len(payload) - 1]))
    shape = draw(st.sampled_from([[1, n], [n], [2, 2]]))
    spec = {"name": "x", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}
    return {"inputs": [spec]}, payload


@given(st.lists(st.one_of(binary_requests(), json_requests()), min_size=2, max_size=8), st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_requests_decoded_together_json_or_binary_get_what_each_would_get_alone(
    requests: list[tuple[dict[str, Any], bytes]], allow: bool
) -> None:
    allowed = {"x"} if allow else set()
    many = oip.decode_inputs_many(requests, allowed)
    assert [_outcome(r) for r in many] == [_alone(h, p, allowed) for h, p in requests]
