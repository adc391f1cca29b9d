"""The Open Inference Protocol (KServe v2) tensor codec: request bodies in, answer bodies out.

A request body is a JSON header (``{"id", "inputs", "outputs", "parameters"}``), optionally followed
by raw tensor bytes (the binary tensor extension: the header's length is the
``Inference-Header-Content-Length`` HTTP header, and each binary input says how many bytes it takes
with ``"parameters": {"binary_data_size": n}``, in input order). Numeric tensors are little-endian
row-major; ``BYTES`` tensors in binary form are a 4-byte little-endian length before each element,
as Triton and ``tritonclient`` lay them out. Outputs come back as JSON, or as binary when the
request asks (``binary_data_output`` for all, or ``binary_data`` per requested output).

Flow of a request: :func:`inflate` (``Content-Encoding`` gzip/deflate, refused past a size cap) ->
:func:`split_body` -> :func:`parse_header` -> :func:`decode_inputs` (one numpy array per input,
each checked against its declared shape and datatype); the answer: :func:`encode_outputs`.
Everything the client got wrong raises :class:`bundles.errors.InputError` (or its
:class:`RequestTooLargeError` / :class:`UnsupportedEncodingError` kin) with one readable sentence,
so a server maps it to a 4xx.

The client's side is the same codec the other way round: :func:`encode_request` (a request's
tensors are laid out like an answer's), then :func:`split_body`, :func:`parse_header` and
:func:`decode_answer` (an answer's tensors are read like a request's). The cloud endpoint, the
device's localhost API and the device's fallback client all use this module, so they agree on
every datatype and layout.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from bundles import jsonio
from bundles.errors import InputError, RequestTooLargeError, UnsupportedEncodingError

DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}  # fmt: skip
"""OIP datatype -> numpy dtype name (``BYTES`` tensors are object arrays of ``str``)."""
MANIFEST_TO_OIP: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16", "uint32": "UINT32",
    "uint64": "UINT64", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32",
    "float64": "FP64", "string": "BYTES",
}  # fmt: skip
"""Manifest dtype name -> OIP datatype."""
_OIP_BY_DTYPE = {np.dtype(np_name): name for name, np_name in DATATYPES.items() if name != "BYTES"}
_LENGTH = struct.Struct("<I")
_NUMERIC = frozenset(name for name in DATATYPES if name != "BYTES")
_NATIVE_DTYPES = {name: np.dtype(np_name) for name, np_name in DATATYPES.items()}
_WIRE_DTYPES = {name: dtype.newbyteorder("<") for name, dtype in _NATIVE_DTYPES.items()}


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype."""
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    found = _OIP_BY_DTYPE.get(dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype)
    if found is None:
        raise InputError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return found


# --- the body ---------------------------------------------------------------------------------------


def inflate(raw: bytes, encoding: str, cap_bytes: int) -> bytes:
    """The body without its ``Content-Encoding`` (gzip, deflate or none), refused past ``cap_bytes``."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(raw) > cap_bytes:
            raise RequestTooLargeError(f"the request body is {len(raw)} bytes; the limit is {cap_bytes}")
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedEncodingError(f"Content-Encoding '{encoding}' is not supported (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=47 if "gzip" in encoding else zlib.MAX_WBITS)  # 47: zlib or gzip header
    try:
        out = inflater.decompress(raw, cap_bytes + 1)
        if encoding == "deflate" and not out and raw:
            inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some clients send it
            out = inflater.decompress(raw, cap_bytes + 1)
    except zlib.error as e:
        raise InputError(f"the {encoding} body is corrupt: {e}") from e
    if len(out) > cap_bytes or inflater.unconsumed_tail:
        raise RequestTooLargeError(f"the {encoding} body inflates past the {cap_bytes}-byte limit")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary payload) by ``Inference-Header-Content-Length`` (None: all JSON)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InputError("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= n <= len(body):
        raise InputError(f"Inference-Header-Content-Length {n} does not fit the {len(body)}-byte body")
    return body[:n], body[n:]


def parse_header(header: bytes, allow_constants: bool = False) -> dict[str, Any]:
    """The JSON header as an object; NaN and infinity literals are refused like any bad JSON.

    ``allow_constants`` lets them through, for a server that refuses non-finite values per input
    instead (the device's API, where an input's schema may allow them). Parsed by
    :func:`bundles.jsonio.loads` (orjson, with the standard library's results).
    """
    try:
        parsed = jsonio.loads(header or b"{}", None if allow_constants else _refuse_constant)
    except (ValueError, RecursionError) as e:
        raise InputError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise InputError("the request body must be a JSON object")
    return parsed


def dumps_answer(answer: Mapping[str, Any]) -> bytes:
    """An answer's JSON header as compact bytes (:func:`bundles.jsonio.dumps`: NaN written as ``NaN``)."""
    return jsonio.dumps(answer)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --- inputs -----------------------------------------------------------------------------------------


def decode_inputs(
    header: Mapping[str, Any], payload: bytes, allow_non_finite: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Every input of a request as a numpy array (binary chunks taken in input order).

    NaN and infinities are refused except in the inputs named in ``allow_non_finite``.
    """
    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise InputError("the request needs a non-empty 'inputs' list")
    return decode_tensors(specs, payload, "input", lambda name: name in allow_non_finite)


def decode_inputs_many(
    requests: Sequence[tuple[Mapping[str, Any], bytes]], allow_non_finite: Collection[str] = ()
) -> list[dict[str, np.ndarray] | InputError]:
    """:func:`decode_inputs` for several requests: each gets its tensors or its own :class:`InputError`.

    Requests whose only input is alike (the same name and datatype, and either a flat list of as many JSON
    numbers or as many bytes of the binary extension: a server's concurrent batch-1 requests, typically)
    are converted by one numpy call and checked for NaN and infinities in one pass; their arrays are rows of
    one array, which nobody else holds. A request that is anything else, or whose row fails a check, is
    decoded alone by :func:`decode_inputs`, so its tensors and its error are exactly what it would get alone.
    """
    results: list[dict[str, np.ndarray] | InputError | None] = [None] * len(requests)
    groups: dict[tuple[str, str, str, int], list[tuple[int, Mapping[str, Any]]]] = {}
    for index, (header, payload) in enumerate(requests):
        found = _one_input(header, payload)
        if found is None:
            results[index] = _decoded_or_error(header, payload, allow_non_finite)
        else:
            groups.setdefault(found[0], []).append((index, found[1]))
    for kind, members in groups.items():
        rows = _alike_rows(kind, members, requests) if len(members) > 1 else None
        _take_rows(kind[1], rows, members, requests, allow_non_finite, results)
    return [r if r is not None else InputError("not decoded") for r in results]


def _one_input(header: Mapping[str, Any], payload: bytes) -> tuple[tuple[str, str, str, int], Mapping[str, Any]] | None:
    """(form, name, datatype, size) of the request's one numeric input and its spec, when it is a flat list of
    JSON numbers (size: their count) or the whole binary payload (size: its bytes); else None."""
    specs = header.get("inputs")
    if not isinstance(specs, list) or len(specs) != 1 or not isinstance(specs[0], dict):
        return None
    spec = specs[0]
    name, datatype, parameters = spec.get("name"), spec.get("datatype"), spec.get("parameters")
    if not isinstance(name, str) or not name or not isinstance(datatype, str) or datatype not in _NUMERIC:
        return None
    if parameters:
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if type(size) is not int or not 0 < size == len(payload) or size % _NATIVE_DTYPES[datatype].itemsize:
            return None
        return ("binary", name, datatype, size), spec
    data = spec.get("data")
    if payload or not isinstance(data, list) or not data or isinstance(data[0], list):
        return None
    return ("json", name, datatype, len(data)), spec


def _alike_rows(
    kind: tuple[str, str, str, int], members: list[tuple[int, Mapping[str, Any]]],
    requests: Sequence[tuple[Mapping[str, Any], bytes]],
) -> np.ndarray | None:  # fmt: skip
    """The alike inputs as the rows of one 2-D array (None when one of them does not convert: each alone
    then says which)."""
    form, _, datatype, _ = kind
    if form == "binary":
        joined = b"".join(requests[index][1] for index, _ in members)
        flat = np.frombuffer(joined, dtype=_WIRE_DTYPES[datatype]).astype(_NATIVE_DTYPES[datatype])
        return flat.reshape(len(members), -1)
    try:
        rows = _json_numbers([spec["data"] for _, spec in members], DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        return None  # a string, a nested list, an inexact integer somewhere
    return rows if rows.ndim == 2 else None


def _take_rows(
    name: str, rows: np.ndarray | None, members: list[tuple[int, Mapping[str, Any]]],
    requests: Sequence[tuple[Mapping[str, Any], bytes]], allow_non_finite: Collection[str],
    results: list[dict[str, np.ndarray] | InputError | None],
) -> None:  # fmt: skip
    """Each member's row reshaped to its declared shape; a member whose shape or values do not pass (or all of
    them, without ``rows``) decoded alone."""
    if rows is None:
        for index, _ in members:
            results[index] = _decoded_or_error(*requests[index], allow_non_finite)
        return
    finite = None
    if name not in allow_non_finite and rows.dtype.kind == "f":
        finite = np.isfinite(rows).all(axis=1)
    for row, (index, spec) in enumerate(members):
        shape: Any = spec.get("shape")
        fits = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        if fits and math.prod(shape) == rows.shape[1] and (finite is None or finite[row]):
            results[index] = {name: rows[row].reshape(shape)}
        else:
            results[index] = _decoded_or_error(*requests[index], allow_non_finite)


def _decoded_or_error(
    header: Mapping[str, Any], payload: bytes, allow_non_finite: Collection[str]
) -> dict[str, np.ndarray] | InputError:
    try:
        return decode_inputs(header, payload, allow_non_finite)
    except InputError as e:
        return e


def decode_tensors(
    specs: list[Any], payload: bytes, what: str, allow_non_finite: Callable[[str], bool]
) -> dict[str, np.ndarray]:
    """Tensor specs (``what``: input or output) as numpy arrays by name, binary chunks taken in order."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise InputError(f"each {what} must be an object with 'name', 'shape', 'datatype'")
        size = binary_size(spec, what)
        chunk = None
        if size is not None:
            chunk, offset = payload[offset : offset + size], offset + size
            if len(chunk) != size:
                raise InputError(f"{what} '{spec.get('name')}': the binary body is shorter than its binary_data_size")
        name = str(spec.get("name"))
        if name in tensors:
            raise InputError(f"{what} '{name}' is given twice")
        tensors[name] = decode_tensor(spec, chunk, allow_non_finite(name), what)
    if offset != len(payload):
        raise InputError(f"the binary body has {len(payload) - offset} bytes that no {what} claims")
    return tensors


def binary_size(spec: Mapping[str, Any], what: str = "input") -> int | None:
    """The ``binary_data_size`` parameter of a tensor spec (None: the tensor is JSON)."""
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InputError(f"{what} '{spec.get('name')}': 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InputError(f"{what} '{spec.get('name')}': binary_data_size must be a non-negative integer")
    return size


def decode_tensor(
    spec: Mapping[str, Any], binary: bytes | None, allow_non_finite: bool = False, what: str = "input"
) -> np.ndarray:
    """One tensor (JSON ``data``, or raw bytes from the binary extension) as a numpy array.

    ``what`` names the tensor's role in error messages (``input`` on a server, ``output`` in a client).
    """
    name, shape, datatype = _tensor_head(spec, what)
    try:
        if datatype == "BYTES":
            array = _bytes_array(binary, name) if binary is not None else _json_strings(spec.get("data"), name)
        elif binary is not None:  # little-endian on the wire; a private, writable array in native order
            array = np.frombuffer(binary, dtype=_WIRE_DTYPES[datatype]).astype(_NATIVE_DTYPES[datatype])
        else:
            array = _json_numbers(spec.get("data"), DATATYPES[datatype])
        array = array.reshape(shape)
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"{what} '{name}': data does not match shape {shape} and datatype {datatype}") from e
    if not allow_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{what} '{name}': NaN or infinite values (or numbers too large for {datatype})")
    return array


def _tensor_head(spec: Mapping[str, Any], what: str) -> tuple[str, list[int], str]:
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise InputError(f"each {what} needs a 'name' (a non-empty string)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"{what} '{name}': 'shape' must be a list of non-negative integers")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list or an object is not hashable
        raise InputError(f"{what} '{name}': datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    return name, shape, str(datatype)


def _json_numbers(data: Any, dtype: str) -> np.ndarray:
    """JSON numbers as ``dtype``; an integer or boolean tensor takes only the values it holds exactly.

    numpy would cast 1.5 to 1 and 1e30 to an arbitrary integer without a word; such data is refused
    instead (a float tensor's too-large values become infinities, refused by the caller).
    """
    if not isinstance(data, list):
        raise ValueError("'data' must be a list")
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: infinity, refused by the caller
        if np.dtype(dtype).kind == "f":  # via float64, which JSON numbers are: 6x faster than a list to float32
            return np.asarray(data, dtype=np.float64).astype(dtype, copy=False)
        array = np.asarray(data, dtype=dtype)
        if not np.array_equal(array, np.asarray(data)):
            raise ValueError(f"'data' holds values a {dtype} tensor cannot hold exactly")
    return array


def _json_strings(data: Any, name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ValueError("'data' must be a list")
    flat = _flatten(data)
    if not all(isinstance(v, str) for v in flat):
        raise InputError(f"input '{name}': BYTES data must be strings")
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    return [x for v in data for x in (_flatten(v) if isinstance(v, list) else [v])]


def _bytes_array(binary: bytes, name: str) -> np.ndarray:
    """Length-prefixed elements (Triton's BYTES layout) as an object array of ``str``."""
    items: list[str] = []
    offset = 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise InputError(f"input '{name}': a BYTES element's length is cut off")
        (length,) = _LENGTH.unpack_from(binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise InputError(f"input '{name}': a BYTES element is shorter than its length")
        try:
            items.append(binary[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"input '{name}': BYTES elements must be UTF-8 text") from e
        offset += length
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --- outputs ----------------------------------------------------------------------------------------


def requested_outputs(header: Mapping[str, Any]) -> dict[str, bool]:
    """Requested output names -> whether each wants binary data (empty: every output)."""
    wanted = header.get("outputs")
    if wanted is None:
        return {}
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise InputError("'outputs' must be a list of {\"name\": ...} objects")
    default = binary_output_default(header)
    found: dict[str, bool] = {}
    for o in wanted:
        parameters = o.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError(f"output '{o['name']}': 'parameters' must be an object")
        found[o["name"]] = bool(parameters.get("binary_data", default))
    return found


def binary_output_default(header: Mapping[str, Any]) -> bool:
    """The request-level ``binary_data_output`` parameter (False when absent)."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InputError("'parameters' must be an object")
    return bool(parameters.get("binary_data_output", False))


def encode_output(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """One output tensor as OIP JSON, or as a header plus raw bytes when ``binary``."""
    array = value if type(value) is np.ndarray else np.asarray(value)
    datatype = _OIP_BY_DTYPE.get(array.dtype) or oip_datatype(array.dtype)
    tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    flat = array if array.ndim == 1 else array.reshape(-1)
    if binary:
        if datatype == "BYTES":
            raw = b"".join(_LENGTH.pack(len(b)) + b for b in (_utf8(v) for v in flat))
        else:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    tensor["data"] = [_text(v) for v in flat] if datatype == "BYTES" else flat.tolist()
    return tensor, None


def _utf8(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def encode_outputs(
    outputs: Mapping[str, np.ndarray], wanted: Mapping[str, bool], default_binary: bool
) -> tuple[list[dict[str, Any]], bytes]:
    """The answer's output tensors (``wanted`` order, or every output) and the binary bytes after the header."""
    names = list(wanted) if wanted else list(outputs)
    tensors, chunks = [], []
    for name in names:
        tensor, raw = encode_output(name, outputs[name], wanted.get(name, default_binary))
        tensors.append(tensor)
        if raw is not None:
            chunks.append(raw)
    return tensors, b"".join(chunks)


def encode_answers_many(
    head: Mapping[str, Any], outputs_list: Sequence[Mapping[str, np.ndarray]], tail: Mapping[str, Any]
) -> list[bytes]:
    """``dumps_answer({**head, "outputs": encode_outputs(outputs, {}, False)[0], **tail})`` for each answer
    (every output as JSON), byte for byte, built from pieces: ``head`` and ``tail`` are written once, and an
    output of the same name, dtype and one-row shape in every answer is converted in one ``tolist`` and
    written row by row (a server's concurrent batch-1 answers, typically)."""
    opening = dumps_answer(head)[:-1] + (b',"outputs":[' if head else b'"outputs":[')
    closing = b"]" + (b"," + dumps_answer(tail)[1:] if tail else b"}")
    names = list(outputs_list[0]) if outputs_list else []
    if not names or any(list(outputs) != names for outputs in outputs_list):
        return [
            opening + b",".join(dumps_answer(t) for t in encode_outputs(outputs, {}, False)[0]) + closing
            for outputs in outputs_list
        ]
    columns = []
    for name in names:
        arrays = [outputs[name] for outputs in outputs_list]
        column = _row_tensor_bytes(name, arrays)
        columns.append(
            column if column is not None else [dumps_answer(encode_output(name, a, False)[0]) for a in arrays]
        )
    return [opening + b",".join(tensors) + closing for tensors in zip(*columns, strict=True)]


def _row_tensor_bytes(name: str, arrays: list[Any]) -> list[bytes] | None:
    """One output of several answers as JSON tensor bytes, when each is a one-row array of one dtype and
    shape with finite numbers or text (else None: each is written alone)."""
    first = arrays[0]
    if type(first) is not np.ndarray or first.ndim not in (1, 2) or first.shape[0] != 1:
        return None
    dtype, shape = first.dtype, first.shape
    if any(type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape for a in arrays):
        return None
    datatype = oip_datatype(dtype)
    stacked = np.concatenate(arrays)
    if dtype.kind == "f" and not np.isfinite(stacked).all():
        return None  # NaN and infinities are written as Python writes them, by dumps_answer
    rows = stacked.reshape(len(arrays), -1).tolist()  # each answer's data, flat
    prefix = dumps_answer({"name": name, "shape": list(shape), "datatype": datatype})[:-1] + b',"data":['
    if datatype == "BYTES":  # text may hold anything: written answer by answer
        return [prefix + jsonio.dumps([_text(v) for v in row])[1:] + b"}" for row in rows]
    # Numbers never hold "],[": the whole column is written once and cut between its rows.
    pieces = jsonio.dumps(rows)[2:-2].split(b"],[")
    return [prefix + piece + b"]}" for piece in pieces]


# --- the client's side -------------------------------------------------------------------------------


def encode_request(inputs: Mapping[str, Any], binary: bool) -> tuple[bytes, dict[str, str]]:
    """A request body and its HTTP headers: JSON tensors, or with ``binary`` the numeric tensors as raw
    bytes after the JSON header (strings stay JSON, which every server reads) and binary outputs asked."""
    specs, chunks = [], []
    for name, value in inputs.items():
        array = np.asarray(value)
        spec, raw = encode_output(name, array, binary and array.dtype.kind not in ("U", "S", "O"))
        specs.append(spec)
        if raw is not None:
            chunks.append(raw)
    header: dict[str, Any] = {"inputs": specs}
    if not binary:
        return dumps_answer(header), {"Content-Type": "application/json"}
    header["parameters"] = {"binary_data_output": True}
    encoded = dumps_answer(header)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(encoded))}
    return encoded + b"".join(chunks), headers


def decode_answer(answer: Mapping[str, Any], payload: bytes) -> dict[str, np.ndarray]:
    """The outputs of an answer (its JSON header parsed, and the binary bytes after it) by name.

    Outputs may hold NaN and infinities (a model's answer is not checked like a client's input);
    a malformed answer raises :class:`InputError` naming the output.
    """
    tensors = answer.get("outputs")
    if not isinstance(tensors, list):
        raise InputError("the answer has no 'outputs' list")
    return decode_tensors(tensors, payload, "output", lambda _name: True)


__all__ = [
    "DATATYPES",
    "MANIFEST_TO_OIP",
    "binary_output_default",
    "binary_size",
    "decode_answer",
    "decode_inputs",
    "decode_tensor",
    "decode_tensors",
    "dumps_answer",
    "encode_output",
    "encode_request",
    "encode_outputs",
    "inflate",
    "oip_datatype",
    "parse_header",
    "requested_outputs",
    "split_body",
]
