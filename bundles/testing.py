"""Builders of small, real bundles for tests, benchmarks and the demo.

Every package's tests need a real model in a real bundle, and they must agree on what one looks
like. This module makes them without any test framework:

- :func:`make_onnx_classifier` writes a tiny linear classifier (one ONNX ``Gemm``, optional dynamic
  batch) and returns its weights, so callers can compute the expected logits with numpy;
  :func:`make_tflite_classifier` writes the same model as TFLite.
- :func:`build_bundle_dir` writes a complete bundle directory (model files, ``manifest.json``)
  with golden cases computed independently in numpy, a feature schema, post-processing
  (softmax, argmax, label map) and a drift baseline; it returns the :class:`Manifest`.
- :func:`with_golden_offset` returns a manifest whose golden outputs were moved, for tests that
  need a self-test to fail.

``onnx`` and the TFLite schema are imported lazily (converter / tflite dependencies, not device ones).

Example::

    from bundles.testing import build_bundle_dir
    from bundles.predictor import Predictor

    manifest = build_bundle_dir(tmp_path / "tiny")
    predictor = Predictor.load(manifest, tmp_path / "tiny")
    predictor.self_test()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundles.canonical import sha256_file
from bundles.manifest import (
    DriftBaseline,
    FeatureSpec,
    FileRef,
    Golden,
    GoldenCase,
    Histogram,
    Lineage,
    Manifest,
    Requirements,
    RuntimeConfig,
    Step,
    TensorSpec,
    Variant,
)
from bundles.tensors import encode_tensor

MANIFEST_FILE = "manifest.json"
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
FIXED_CREATED_AT = "2026-01-01T00:00:00Z"
"""A fixed timestamp so that the same builder arguments always give the same manifest bytes."""


@dataclass(frozen=True)
class TinyClassifier:
    """A linear classifier written as ONNX: ``logits = x @ weight + bias``."""

    path: Path | None  # None for the in-memory reference
    weight: np.ndarray  # [n_features, n_classes], float32 (already rounded for fp16 models)
    bias: np.ndarray  # [n_classes], float32
    precision: str

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's output for ``x`` ([batch, n_features]) computed in numpy."""
        logits: np.ndarray = (np.asarray(x, dtype=np.float32) @ self.weight + self.bias).astype(np.float32)
        return logits


def make_onnx_classifier(
    path: str | Path,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    dynamic_batch: bool = True,
    precision: str = "fp32",
    opset: int = 17,
) -> TinyClassifier:
    """Write a one-``Gemm`` ONNX classifier with input ``x`` and output ``logits``.

    ``precision="fp16"`` stores the weights as float16 and casts them to float32 in the graph
    (inputs and outputs stay float32, as converters do with ``keep_io_types``). A static batch
    fixes the batch dimension to 1.
    """
    import onnx
    from onnx import TensorProto, helper

    weight, bias = _weights(n_features, n_classes, seed)
    batch: int | str = "batch" if dynamic_batch else 1
    nodes, inits = _gemm_nodes(weight, bias, precision)
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bundles.testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    if precision == "fp16":
        weight, bias = weight.astype(np.float16).astype(np.float32), bias.astype(np.float16).astype(np.float32)
    return TinyClassifier(path=out, weight=weight, bias=bias, precision=precision)


def make_tflite_classifier(
    path: str | Path,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    dynamic_batch: bool = True,
    signature: bool = True,
) -> TinyClassifier:
    """Write the same classifier as a TFLite flatbuffer (one ``FULLY_CONNECTED``, signature ``x -> logits``).

    Built with the schema bundled in ``ai-edge-litert`` (no TensorFlow needed); same weights as
    :func:`make_onnx_classifier` for the same ``seed``. ``signature=False`` leaves out the
    signature, as older converters did (tensors are then found by name).
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    weight, bias = _weights(n_features, n_classes, seed)
    buffers = [schema.BufferT() for _ in range(5)]
    buffers[2].data = list(np.ascontiguousarray(weight.T).tobytes())  # FULLY_CONNECTED wants [out, in]
    buffers[3].data = list(bias.tobytes())
    batch_sig = -1 if dynamic_batch else 1
    tensors = [
        _tflite_tensor(schema, INPUT_NAME, [1, n_features], 1, [batch_sig, n_features]),
        _tflite_tensor(schema, "weight", [n_classes, n_features], 2, None),
        _tflite_tensor(schema, "bias", [n_classes], 3, None),
        _tflite_tensor(schema, OUTPUT_NAME, [1, n_classes], 4, [batch_sig, n_classes]),
    ]
    model = schema.ModelT()
    model.version, model.description, model.buffers = 3, b"bundles.testing", buffers
    model.operatorCodes = [_tflite_opcode(schema)]
    model.subgraphs = [_tflite_subgraph(schema, tensors)]
    model.signatureDefs = [_tflite_signature(schema)] if signature else []
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(builder.Output()))
    return TinyClassifier(path=out, weight=weight, bias=bias, precision="fp32")


def _tflite_tensor(schema: Any, name: str, shape: list[int], buffer: int, signature: list[int] | None) -> Any:
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name.encode(), shape, schema.TensorType.FLOAT32, buffer
    if signature is not None:
        tensor.shapeSignature = signature
    return tensor


def _tflite_opcode(schema: Any) -> Any:
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    return code


def _tflite_subgraph(schema: Any, tensors: list[Any]) -> Any:
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators, graph.name = tensors, [0], [3], [op], b"main"
    return graph


def _tflite_signature(schema: Any) -> Any:
    def tensor_map(name: str, index: int) -> Any:
        mapped = schema.TensorMapT()
        mapped.name, mapped.tensorIndex = name.encode(), index
        return mapped

    signature = schema.SignatureDefT()
    signature.inputs, signature.outputs = [tensor_map(INPUT_NAME, 0)], [tensor_map(OUTPUT_NAME, 3)]
    signature.signatureKey, signature.subgraphIndex = b"serving_default", 0
    return signature


def _weights(n_features: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 1.0, size=(n_features, n_classes)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=(n_classes,)).astype(np.float32)
    return weight, bias


def reference_classifier(n_features: int = 4, n_classes: int = 3, seed: int = 0) -> TinyClassifier:
    """The fp32 weights :func:`make_onnx_classifier` uses for ``seed``, without writing a file."""
    weight, bias = _weights(n_features, n_classes, seed)
    return TinyClassifier(path=None, weight=weight, bias=bias, precision="fp32")


def _gemm_nodes(weight: np.ndarray, bias: np.ndarray, precision: str) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    if precision == "fp32":
        inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
        return [helper.make_node("Gemm", [INPUT_NAME, "W", "B"], [OUTPUT_NAME])], inits
    if precision != "fp16":
        raise ValueError(f"make_onnx_classifier: precision must be fp32 or fp16, got {precision!r}")
    inits = [
        numpy_helper.from_array(weight.astype(np.float16), "W16"),
        numpy_helper.from_array(bias.astype(np.float16), "B16"),
    ]
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], to=1),
        helper.make_node("Cast", ["B16"], ["B"], to=1),
        helper.make_node("Gemm", [INPUT_NAME, "W", "B"], [OUTPUT_NAME]),
    ]
    return nodes, inits


def build_bundle_dir(
    bundle_dir: str | Path,
    name: str = "tiny",
    version: int = 1,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    precisions: Sequence[str] = ("fp32",),
    golden_cases: int = 3,
    golden_batch: int = 2,
    min_runtime_version: str = "1.16",
    dynamic_batch: bool = True,
    tflite: bool = False,
) -> Manifest:
    """Write a runnable bundle directory and return its manifest (also saved as ``manifest.json``).

    One ONNX variant per precision (ids ``onnx-fp32``, ``onnx-fp16``), all built from the same
    weights. Golden expected outputs are computed in numpy from the fp32 weights with a tolerance
    that fp16 storage meets. ``dynamic_batch=False`` fixes the batch dimension to 1 (golden cases
    then hold one row each). ``tflite=True`` adds a ``tflite-fp32`` variant (runtime ``litert``)
    built from the same weights. Same arguments, same bytes.
    """
    root = Path(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    models = [
        make_onnx_classifier(root / f"onnx-{p}" / "model.onnx", n_features, n_classes, seed, dynamic_batch, p)
        for p in precisions
    ]
    reference = reference_classifier(n_features, n_classes, seed)
    tflite_variant: tuple[Variant, ...] = ()
    if tflite:
        lite = make_tflite_classifier(root / "tflite-fp32" / "model.tflite", n_features, n_classes, seed, dynamic_batch)
        tflite_variant = (_variant_for(lite, root, "tflite", "1.0"),)
    batch = -1 if dynamic_batch else 1
    golden_batch = golden_batch if dynamic_batch else 1
    manifest = Manifest(
        name=name,
        version=version,
        label=f"{name} v{version}",
        created_at=FIXED_CREATED_AT,
        task="classification",
        inputs=(TensorSpec(INPUT_NAME, "float32", (batch, n_features), {"0": (1, 64)} if dynamic_batch else {}),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", (batch, n_classes)),),
        features=tuple(FeatureSpec(f"f{i}", "float", INPUT_NAME, i, -5.0, 5.0) for i in range(n_features)),
        postprocess=_classifier_postprocess(n_classes),
        variants=tuple(_variant_for(m, root, "onnx", min_runtime_version) for m in models) + tflite_variant,
        golden=_golden_for(reference, n_features, golden_cases, golden_batch, seed),
        drift_baseline=_baseline_for(reference, n_features, seed),
        lineage=Lineage(source_sha256="0" * 64, tool_versions={"bundles.testing": "1"}),
        runtime_config=RuntimeConfig(threads=1, deadline_ms=50.0),
    )
    write_manifest(root, manifest)
    return manifest


def _classifier_postprocess(n_classes: int) -> tuple[Step, ...]:
    return (
        Step("softmax", {"tensor": OUTPUT_NAME, "output": "probabilities"}),
        Step("argmax", {"tensor": "probabilities", "output": "class_index"}),
        Step("label_map", {"tensor": "class_index", "output": "label", "labels": [f"c{i}" for i in range(n_classes)]}),
    )


def _variant_for(model: TinyClassifier, root: Path, target: str, min_runtime_version: str) -> Variant:
    assert model.path is not None
    rel = model.path.relative_to(root).as_posix()
    ref = FileRef(path=rel, sha256=sha256_file(model.path), size_bytes=model.path.stat().st_size)
    return Variant(
        id=f"{target}-{model.precision}",
        target=target,
        precision=model.precision,
        entry=rel,
        files=(ref,),
        requirements=Requirements(
            runtime="onnxruntime" if target == "onnx" else "litert", min_runtime_version=min_runtime_version
        ),
        metrics={"top1_agreement": 1.0},
        status="passed",
    )


def _golden_inputs(n_features: int, cases: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return [rng.uniform(-2.0, 2.0, size=(batch, n_features)).astype(np.float32) for _ in range(cases)]


def _golden_for(model: TinyClassifier, n_features: int, cases: int, batch: int, seed: int) -> Golden:
    built = tuple(
        GoldenCase(inputs={INPUT_NAME: encode_tensor(x)}, expected={OUTPUT_NAME: encode_tensor(model.logits(x))})
        for x in _golden_inputs(n_features, cases, batch, seed)
    )
    return Golden(cases=built, atol=1e-2, rtol=1e-2, top1_agreement=1.0)


def _baseline_for(model: TinyClassifier, n_features: int, seed: int) -> DriftBaseline:
    rng = np.random.default_rng(seed + 2)
    x = rng.uniform(-2.0, 2.0, size=(256, n_features)).astype(np.float32)
    edges = np.linspace(-2.0, 2.0, 9)
    feats = tuple(_histogram(f"f{i}", x[:, i], edges) for i in range(n_features))
    classes = np.bincount(model.logits(x).argmax(axis=1), minlength=model.weight.shape[1])
    freqs = tuple(float(c) / len(x) for c in classes)
    labels = tuple(f"c{i}" for i in range(len(classes)))
    return DriftBaseline(features=feats, output=Histogram("label", categories=labels, freqs=freqs))


def _histogram(name: str, values: np.ndarray, edges: np.ndarray) -> Histogram:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    freqs = tuple(float(c) / len(values) for c in counts)
    return Histogram(name=name, edges=tuple(float(e) for e in edges), freqs=freqs)


def golden_inputs(manifest: Manifest) -> list[dict[str, np.ndarray]]:
    """The golden cases' inputs decoded to numpy, handy as realistic sample requests."""
    from bundles.tensors import decode_tensor

    return [{k: decode_tensor(v) for k, v in case.inputs.items()} for case in manifest.golden.cases]


def with_golden_offset(manifest: Manifest, offset: float = 1.0) -> Manifest:
    """A copy of ``manifest`` whose golden expected outputs are shifted by ``offset`` (self-test fails)."""
    from bundles.tensors import decode_tensor

    def shift(case: GoldenCase) -> GoldenCase:
        moved = {k: encode_tensor(decode_tensor(v) + np.float32(offset)) for k, v in case.expected.items()}
        return GoldenCase(inputs=case.inputs, expected=moved)

    golden = dataclasses.replace(manifest.golden, cases=tuple(shift(c) for c in manifest.golden.cases))
    return dataclasses.replace(manifest, golden=golden)


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (canonical bytes) into ``bundle_dir`` and return its path."""
    path = Path(bundle_dir) / MANIFEST_FILE
    path.write_bytes(manifest.to_bytes())
    return path


__all__ = [
    "FIXED_CREATED_AT",
    "INPUT_NAME",
    "MANIFEST_FILE",
    "OUTPUT_NAME",
    "TinyClassifier",
    "build_bundle_dir",
    "golden_inputs",
    "make_onnx_classifier",
    "make_tflite_classifier",
    "reference_classifier",
    "with_golden_offset",
    "write_manifest",
]
