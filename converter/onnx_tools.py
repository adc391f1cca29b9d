"""Small ONNX / ONNX Runtime helpers shared by sources, exporters, quantisation and gates.

Every third-party failure is wrapped here into a :class:`ConversionError` with one readable
sentence, so the callers only add which model and variant it was about.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError, EdgeFleetError
from bundles.manifest import TensorSpec

_UNSUPPORTED_RES = (
    re.compile(r"Could not find an implementation for (\S+?)\(\d+\)"),
    re.compile(r"(\S+) is not a registered function/op"),
    re.compile(r"No Op registered for (\S+) with domain"),
    re.compile(r"No opset import for domain '([^']*)'"),
)
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "float64", 8: "string"}  # fmt: skip


def load_onnx(path: Path) -> Any:
    """``onnx.load`` with external data, wrapped."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError, ValidationError...
        raise ConversionError(f"{path.name} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)})") from e


def check_model(model: Any, what: str) -> Any:
    """Run the ONNX checker and shape inference; return the inferred model.

    Shape inference is not strict: skl2onnx emits graphs (multi-class gradient boosting) whose
    strict inference fails on an untyped intermediate that the checker and ONNX Runtime accept.
    Whether the model runs, and gives the source's outputs, is what the gates measure next.
    """
    import onnx

    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise ConversionError(f"{what} is not a valid ONNX model: {_first_line(e)}") from e


def canonicalize(model: Any) -> Any:
    """Put the parts of a model whose order carries no meaning in one order (in place; returns it).

    Exporters build some lists from hash-ordered sets: skl2onnx writes its opset imports in an order
    that follows ``PYTHONHASHSEED``, so the same estimator gave different bytes from run to run.
    Sorted here: opset imports (by domain), model and node metadata (by key), node attributes (by
    name, recursively in subgraphs) and initializers (by name). Node order is left alone (it must
    stay topological and the exporters write it deterministically).
    """
    _sort_field(model.opset_import, lambda o: o.domain)
    _sort_field(model.metadata_props, lambda p: p.key)
    _canonical_graph(model.graph)
    for function in model.functions:
        _sort_field(function.opset_import, lambda o: o.domain)
        for node in function.node:
            _canonical_node(node)
    return model


def _canonical_graph(graph: Any) -> None:
    _sort_field(graph.initializer, lambda t: t.name)
    for node in graph.node:
        _canonical_node(node)


def _canonical_node(node: Any) -> None:
    _sort_field(node.attribute, lambda a: a.name)
    _sort_field(node.metadata_props, lambda p: p.key)
    for attribute in node.attribute:
        if attribute.HasField("g"):
            _canonical_graph(attribute.g)
        for graph in attribute.graphs:
            _canonical_graph(graph)


def _sort_field(repeated: Any, key: Any) -> None:
    items = sorted((item for item in repeated), key=key)
    copies = [type(item)() for item in items]
    for copy, item in zip(copies, items, strict=True):
        copy.CopyFrom(item)
    del repeated[:]
    repeated.extend(copies)


def save_canonical(model: Any, path: Path) -> None:
    """Write ``model`` as one self-contained file in canonical order (see :func:`canonicalize`)."""
    import onnx

    onnx.save_model(canonicalize(model), str(path), save_as_external_data=False)


def check_inputs_match_spec(model: Any, specs: tuple[TensorSpec, ...], what: str,
                            error: type[EdgeFleetError] = ConversionError) -> None:  # fmt: skip
    """The graph's inputs must be the declared ones, with compatible dtypes, ranks and fixed dims.

    ``error`` is the class raised: a ConfigError at registration (the spec contradicts the model the
    user brought), a ConversionError for an export (the exporter changed the inputs).
    """
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    declared = [s.name for s in specs]
    if sorted(graph_inputs) != sorted(declared):
        raise error(f"{what}: the model's inputs are {sorted(graph_inputs)}, the spec declares {declared}")
    for spec in specs:
        _check_one_input(graph_inputs[spec.name], spec, what, error)


def _check_one_input(value_info: Any, spec: TensorSpec, what: str, error: type[EdgeFleetError]) -> None:
    tensor_type = value_info.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))
    if dtype != spec.dtype:
        raise error(f"{what}: input '{spec.name}' is {dtype} in the model, the spec declares {spec.dtype}")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    contradicts = len(dims) != len(spec.shape) or any(
        model_dim > 0 and declared != model_dim for model_dim, declared in zip(dims, spec.shape, strict=False)
    )
    if contradicts:
        raise error(f"{what}: input '{spec.name}' has shape {dims} in the model, the spec declares {list(spec.shape)}")


def make_session(path: Path | bytes, what: str, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session on a file (or a serialised model); an unsupported operator is named in the error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        model = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"{what}: {describe_runtime_error(e)}") from e


def describe_runtime_error(error: Exception) -> str:
    """One line for an ONNX Runtime error, naming the operator when it is an unsupported one."""
    message = str(error)
    for pattern in _UNSUPPORTED_RES:
        match = pattern.search(message)
        if match:
            return f"unsupported operator {match.group(1)} (ONNX Runtime has no kernel for it)"
    return f"ONNX Runtime cannot load or run it ({_first_line(error)})"


def run_session(session: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run once; outputs by name, as numpy arrays."""
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, inputs)
    except Exception as e:
        raise ConversionError(describe_runtime_error(e)) from e
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def output_names(path: Path) -> list[str]:
    model = load_onnx(path)
    return [o.name for o in model.graph.output]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, capped: what a one-line CLI error can carry."""
    return _first_line(error)
