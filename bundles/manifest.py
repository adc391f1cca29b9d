"""The bundle manifest: the versioned tuple that is deployed and rolled back as one.

A manifest is plain data (frozen dataclasses, no pydantic) so that the device and the converter
stay light and the signed bytes stay under our control. Every class has ``from_dict`` and
``to_dict``; keys a reader does not know are kept in ``extra`` and written back unchanged, so an
older agent can pass a newer manifest through without losing fields (as python-tuf does with
``unrecognized_fields``). The normative description of every field is ``docs/bundle-format.md``.

Flow: the converter builds a :class:`Manifest`, :func:`bundles.canonical.canonical_json` turns it
into the bytes that are hashed and signed; the device parses those bytes with
:meth:`Manifest.from_bytes`, which validates before anything else looks at the content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from bundles.errors import ManifestError

FORMAT_VERSION = 1
"""The manifest format this code writes. Readers accept this and lower versions."""

TARGETS = ("onnx", "ort", "tflite", "coreml", "gguf")
TASKS = ("classification", "regression", "embedding", "detection", "generation", "other")
DTYPES = (
    "bool", "uint8", "int8", "uint16", "int16", "int32", "int64",
    "float16", "float32", "float64", "string",
)  # fmt: skip
STEP_OPS = (
    "cast", "reshape", "scale", "normalize", "clip", "softmax", "argmax", "topk",
    "label_map", "tokenizer", "transpose", "expand_dims",
)  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DEPLOYMENT_TARGET_RE = re.compile(r"^(macOS|iOS|tvOS|watchOS|visionOS)\d+(\.\d+)*$")

T = TypeVar("T")


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Return ``data[key]`` if present and of ``kind``, else raise a ManifestError naming it."""
    if key not in data:
        raise ManifestError(f"{where}: missing required field '{key}'")
    value = data[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ManifestError(f"{where}.{key}: expected a number, got a boolean")
    if not isinstance(value, kind):
        raise ManifestError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _optional(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    """Like :func:`_require` but returns ``default`` when the key is absent or null."""
    if data.get(key) is None:
        return default
    return _require(data, key, kind, where)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``data`` this reader does not know, kept to be written back unchanged."""
    return {k: v for k, v in data.items() if k not in known}


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ManifestError(f"{where}: '{value}' is not one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, dtype and shape (-1 marks a dynamic dimension).

    ``dim_ranges`` gives, for dynamic dimensions, the inclusive [min, max] the model was validated
    at, keyed by the dimension index as a string (JSON keys are strings).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("name", "dtype", "shape", "dim_ranges")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "tensor") -> TensorSpec:
        data = _mapping(data, where)
        name = _require(data, "name", str, where)
        where = f"{where}[{name}]"
        shape = _require(data, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 and d != 0 for d in shape):
            raise ManifestError(f"{where}.shape: dimensions must be positive integers or -1, got {shape}")
        ranges_raw = _mapping(_optional(data, "dim_ranges", dict, where, {}), f"{where}.dim_ranges")
        ranges = {str(k): _dim_range(v, f"{where}.dim_ranges.{k}") for k, v in ranges_raw.items()}
        return cls(
            name=name,
            dtype=_one_of(_require(data, "dtype", str, where), DTYPES, f"{where}.dtype"),
            shape=tuple(shape),
            dim_ranges=ranges,
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.dim_ranges:
            out["dim_ranges"] = {k: list(v) for k, v in self.dim_ranges.items()}
        return {**self.extra, **out}


def _dim_range(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)
    if not ok or value[0] > value[1]:
        raise ManifestError(f"{where}: expected [min, max] with 0 < min <= max, got {value}")
    return (value[0], value[1])


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature as the data scientist knows it: a name, a type and its valid range.

    ``index`` locates the feature in the flattened model input ``tensor`` (per sample). A feature
    marked ``sensitive`` is redacted from sampled prediction logs.
    """

    name: str
    type: str = "float"  # float | int | category
    tensor: str = ""
    index: int = 0
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    sensitive: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "name", "type", "tensor", "index", "min", "max", "categories", "sensitive",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "feature") -> FeatureSpec:
        data = _mapping(data, where)
        name = _require(data, "name", str, where)
        where = f"{where}[{name}]"
        lo = _optional(data, "min", (int, float), where, None)
        hi = _optional(data, "max", (int, float), where, None)
        if lo is not None and hi is not None and lo > hi:
            raise ManifestError(f"{where}: min {lo} is greater than max {hi}")
        return cls(
            name=name,
            type=_one_of(_optional(data, "type", str, where, "float"), ("float", "int", "category"), f"{where}.type"),
            tensor=_optional(data, "tensor", str, where, ""),
            index=_optional(data, "index", int, where, 0),
            min=None if lo is None else float(lo),
            max=None if hi is None else float(hi),
            categories=tuple(_optional(data, "categories", list, where, [])),
            sensitive=_optional(data, "sensitive", bool, where, False),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "tensor": self.tensor, "index": self.index}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.categories:
            out["categories"] = list(self.categories)
        if self.sensitive:
            out["sensitive"] = True
        return {**self.extra, **out}


@dataclass(frozen=True)
class Step:
    """A declarative pre- or post-processing step: an ``op`` from :data:`STEP_OPS` and its params.

    Examples: ``{"op": "scale", "factor": 0.0625}``, ``{"op": "normalize", "mean": [..], "std": [..]}``,
    ``{"op": "softmax", "axis": -1}``, ``{"op": "label_map", "labels": ["0", "1", ...]}``,
    ``{"op": "tokenizer", "file": "tokenizer.json"}``. Steps apply to ``tensor`` (default: the
    first input for pre-processing, the first output for post-processing).
    """

    op: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "step") -> Step:
        data = _mapping(data, where)
        op = _one_of(_require(data, "op", str, where), STEP_OPS, f"{where}.op")
        return cls(op=op, params={k: v for k, v in data.items() if k != "op"})

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **self.params}


@dataclass(frozen=True)
class ValidatedRuntime:
    """A runtime and the version of it on which the converter measured the variant's parity and metric."""

    runtime: str
    version: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "validated_runtime") -> ValidatedRuntime:
        data = _mapping(data, where)
        return cls(runtime=_require(data, "runtime", str, where), version=_require(data, "version", str, where))

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "version": self.version}

    def describe(self) -> str:
        return f"{self.runtime} {self.version}"


@dataclass(frozen=True)
class Requirements:
    """What a device needs to run a variant.

    ``validated_runtimes`` lists the runtimes (and versions) on which the converter executed the
    variant and it met its gates; when it is not empty, a device may run the variant only on one of
    them (:func:`bundles.selection.validated_runtime_for`), because an older or different runtime can
    load a model and silently compute something else. ``deployment_target`` is the lowest OS release
    the format needs (Core ML: ``macOS13``).
    """

    runtime: str  # onnxruntime | litert | tflite_runtime | llama_cpp | coreml
    min_runtime_version: str = "0"
    arch: tuple[str, ...] = ()  # empty = any; else e.g. ("x86_64", "aarch64")
    accelerators: tuple[str, ...] = ()  # required accelerators, e.g. ("cuda",); empty = CPU is fine
    min_memory_mb: int = 0
    os: tuple[str, ...] = ()  # empty = any; else e.g. ("darwin",) for Core ML
    validated_runtimes: tuple[ValidatedRuntime, ...] = ()
    deployment_target: str = ""  # e.g. "macOS13"; empty = none
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "runtime", "min_runtime_version", "arch", "accelerators", "min_memory_mb", "os", "validated_runtimes",
        "deployment_target",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "requirements") -> Requirements:
        data = _mapping(data, where)
        validated = _optional(data, "validated_runtimes", list, where, [])
        deployment_target = _optional(data, "deployment_target", str, where, "")
        if deployment_target and not _DEPLOYMENT_TARGET_RE.match(deployment_target):
            raise ManifestError(f"{where}.deployment_target: '{deployment_target}' is not like 'macOS13' or 'iOS16'")
        return cls(
            runtime=_require(data, "runtime", str, where),
            min_runtime_version=_optional(data, "min_runtime_version", str, where, "0"),
            arch=tuple(_optional(data, "arch", list, where, [])),
            accelerators=tuple(_optional(data, "accelerators", list, where, [])),
            min_memory_mb=_optional(data, "min_memory_mb", int, where, 0),
            os=tuple(_optional(data, "os", list, where, [])),
            validated_runtimes=tuple(
                ValidatedRuntime.from_dict(v, f"{where}.validated_runtimes[{i}]") for i, v in enumerate(validated)
            ),
            deployment_target=deployment_target,
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runtime": self.runtime,
            "min_runtime_version": self.min_runtime_version,
            "arch": list(self.arch),
            "accelerators": list(self.accelerators),
            "min_memory_mb": self.min_memory_mb,
            "os": list(self.os),
        }
        if self.validated_runtimes:
            out["validated_runtimes"] = [v.to_dict() for v in self.validated_runtimes]
        if self.deployment_target:
            out["deployment_target"] = self.deployment_target
        return {**self.extra, **out}


@dataclass(frozen=True)
class FileRef:
    """A file inside the bundle, by relative POSIX path, with its size and sha256."""

    path: str
    sha256: str
    size_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("path", "sha256", "size_bytes")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "file") -> FileRef:
        data = _mapping(data, where)
        path = _require(data, "path", str, where)
        _check_relative_path(path, f"{where}.path")
        sha = _require(data, "sha256", str, where)
        if not _SHA256_RE.match(sha):
            raise ManifestError(f"{where}[{path}].sha256: not a lowercase hex sha256")
        size = _require(data, "size_bytes", int, where)
        if size < 0:
            raise ManifestError(f"{where}[{path}].size_bytes: negative")
        return cls(path=path, sha256=sha, size_bytes=size, extra=_extra(data, cls.KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "path": self.path, "sha256": self.sha256, "size_bytes": self.size_bytes}


def _check_relative_path(path: str, where: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"{where}: '{path}' is not a safe relative POSIX path")


@dataclass(frozen=True)
class Variant:
    """One executable form of the model: a target format at a precision, with its files.

    ``entry`` is the path the runtime loads (a file, or a directory for a Core ML ``.mlpackage``);
    ``files`` lists every file of the variant with its hash. ``status`` is ``passed`` when the
    converter executed it in its real runtime and it met its gates, ``structural`` when the host
    could not execute it (Core ML on Linux) and only its structure was validated.
    """

    id: str
    target: str
    precision: str
    entry: str
    files: tuple[FileRef, ...]
    requirements: Requirements
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "passed"
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "id", "target", "precision", "entry", "files", "requirements", "metrics", "status",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "variant") -> Variant:
        data = _mapping(data, where)
        vid = _require(data, "id", str, where)
        if not _NAME_RE.match(vid):
            raise ManifestError(f"{where}.id: '{vid}' must match {_NAME_RE.pattern}")
        where = f"{where}[{vid}]"
        entry = _require(data, "entry", str, where)
        _check_relative_path(entry, f"{where}.entry")
        files_raw = _require(data, "files", list, where)
        files = tuple(FileRef.from_dict(f, f"{where}.files") for f in files_raw)
        if not files:
            raise ManifestError(f"{where}.files: a variant needs at least one file")
        return cls(
            id=vid,
            target=_one_of(_require(data, "target", str, where), TARGETS, f"{where}.target"),
            precision=_require(data, "precision", str, where),
            entry=entry,
            files=files,
            requirements=Requirements.from_dict(_require(data, "requirements", dict, where), f"{where}.requirements"),
            metrics=dict(_optional(data, "metrics", dict, where, {})),
            status=_one_of(
                _optional(data, "status", str, where, "passed"), ("passed", "structural"), f"{where}.status"
            ),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "target": self.target,
            "precision": self.precision,
            "entry": self.entry,
            "files": [f.to_dict() for f in self.files],
            "requirements": self.requirements.to_dict(),
            "metrics": dict(self.metrics),
            "status": self.status,
        }
        return {**self.extra, **out}

    @property
    def size_bytes(self) -> int:
        """Total bytes of the variant's files."""
        return sum(f.size_bytes for f in self.files)


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor in JSON: dtype, shape and the values flattened row-major."""

    dtype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("dtype", "shape", "data")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "tensor") -> EncodedTensor:
        data = _mapping(data, where)
        shape = tuple(_require(data, "shape", list, where))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ManifestError(f"{where}.shape: dimensions must be non-negative integers, got {list(shape)}")
        values = tuple(_require(data, "data", list, where))
        count = 1
        for d in shape:
            count *= d
        if count != len(values):
            raise ManifestError(f"{where}: shape {list(shape)} needs {count} values, got {len(values)}")
        dtype = _one_of(_require(data, "dtype", str, where), DTYPES, f"{where}.dtype")
        return cls(dtype=dtype, shape=shape, data=values, extra=_extra(data, cls.KNOWN))

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "dtype": self.dtype, "shape": list(self.shape), "data": list(self.data)}


@dataclass(frozen=True)
class GoldenCase:
    """A golden input with the output the model must reproduce on the device."""

    inputs: dict[str, EncodedTensor]
    expected: dict[str, EncodedTensor]
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("inputs", "expected")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "golden") -> GoldenCase:
        data = _mapping(data, where)
        inputs = _require(data, "inputs", dict, where)
        expected = _require(data, "expected", dict, where)
        return cls(
            inputs={k: EncodedTensor.from_dict(v, f"{where}.inputs.{k}") for k, v in inputs.items()},
            expected={k: EncodedTensor.from_dict(v, f"{where}.expected.{k}") for k, v in expected.items()},
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "expected": {k: v.to_dict() for k, v in self.expected.items()},
        }


@dataclass(frozen=True)
class Golden:
    """Golden cases and the tolerance they are checked with (``|a-b| <= atol + rtol*|b|``).

    ``top1_agreement`` (0..1), when set, also requires that fraction of argmax agreement on the
    first output, which is what matters for a quantised classifier whose logits move slightly.
    Expected outputs are the *model* outputs (before post-processing). ``variant_tolerances``
    overrides ``atol``/``rtol``/``top1_agreement`` per variant id (a quantised variant is checked
    against the same expected outputs with the looser tolerance its gates accepted).
    """

    cases: tuple[GoldenCase, ...] = ()
    atol: float = 1e-4
    rtol: float = 1e-3
    top1_agreement: float | None = None
    variant_tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("cases", "atol", "rtol", "top1_agreement", "variant_tolerances")
    TOLERANCE_KEYS: ClassVar[tuple[str, ...]] = ("atol", "rtol", "top1_agreement")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "golden") -> Golden:
        data = _mapping(data, where)
        cases = _optional(data, "cases", list, where, [])
        top1 = _optional(data, "top1_agreement", (int, float), where, None)
        return cls(
            cases=tuple(GoldenCase.from_dict(c, f"{where}.cases[{i}]") for i, c in enumerate(cases)),
            atol=float(_optional(data, "atol", (int, float), where, 1e-4)),
            rtol=float(_optional(data, "rtol", (int, float), where, 1e-3)),
            top1_agreement=None if top1 is None else float(top1),
            variant_tolerances=_variant_tolerances(data, where),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cases": [c.to_dict() for c in self.cases], "atol": self.atol, "rtol": self.rtol}
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        if self.variant_tolerances:
            out["variant_tolerances"] = {k: dict(v) for k, v in self.variant_tolerances.items()}
        return {**self.extra, **out}

    def tolerance_for(self, variant_id: str) -> tuple[float, float, float | None]:
        """``(atol, rtol, top1_agreement)`` that apply to ``variant_id``."""
        override = self.variant_tolerances.get(variant_id, {})
        return (
            override.get("atol", self.atol),
            override.get("rtol", self.rtol),
            override.get("top1_agreement", self.top1_agreement),
        )


def _variant_tolerances(data: Mapping[str, Any], where: str) -> dict[str, dict[str, float]]:
    raw = _mapping(_optional(data, "variant_tolerances", dict, where, {}), f"{where}.variant_tolerances")
    out: dict[str, dict[str, float]] = {}
    for vid, tol in raw.items():
        tol = _mapping(tol, f"{where}.variant_tolerances.{vid}")
        unknown = sorted(set(tol) - set(Golden.TOLERANCE_KEYS))
        if unknown:
            raise ManifestError(f"{where}.variant_tolerances.{vid}: unknown keys {unknown}")
        out[str(vid)] = {k: float(_require(tol, k, (int, float), f"{where}.variant_tolerances.{vid}")) for k in tol}
    return out


@dataclass(frozen=True)
class Histogram:
    """Reference distribution of one feature or output: bin edges and reference frequencies.

    Numeric: ``edges`` has n+1 ascending values, ``freqs`` n values summing to 1; values outside
    the edges fall into the first or last bin. Categorical: ``categories`` has n labels.
    """

    name: str
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    freqs: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("name", "edges", "categories", "freqs")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "histogram") -> Histogram:
        data = _mapping(data, where)
        name = _require(data, "name", str, where)
        where = f"{where}[{name}]"
        edges = tuple(float(e) for e in _optional(data, "edges", list, where, []))
        cats = tuple(str(c) for c in _optional(data, "categories", list, where, []))
        freqs = tuple(float(f) for f in _require(data, "freqs", list, where))
        bins = len(edges) - 1 if edges else len(cats)
        if bins != len(freqs) or bins <= 0:
            raise ManifestError(f"{where}: {len(freqs)} frequencies do not match {bins} bins")
        if edges and any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ManifestError(f"{where}.edges: must be strictly ascending")
        return cls(name=name, edges=edges, categories=cats, freqs=freqs, extra=_extra(data, cls.KNOWN))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "freqs": list(self.freqs)}
        if self.edges:
            out["edges"] = list(self.edges)
        if self.categories:
            out["categories"] = list(self.categories)
        return {**self.extra, **out}


@dataclass(frozen=True)
class DriftBaseline:
    """Training-time distributions that on-device histograms and server-side PSI are computed on."""

    features: tuple[Histogram, ...] = ()
    output: Histogram | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("features", "output")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "drift_baseline") -> DriftBaseline:
        data = _mapping(data, where)
        feats = _optional(data, "features", list, where, [])
        out = data.get("output")
        return cls(
            features=tuple(Histogram.from_dict(f, f"{where}.features") for f in feats),
            output=None if out is None else Histogram.from_dict(out, f"{where}.output"),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"features": [f.to_dict() for f in self.features]}
        if self.output is not None:
            out["output"] = self.output.to_dict()
        return {**self.extra, **out}


@dataclass(frozen=True)
class Lineage:
    """Where the bundle came from, so that the same inputs can be shown to give the same bundle."""

    source_sha256: str = ""
    calibration_sha256: str = ""
    eval_sha256: str = ""
    registry_version: int = 0
    tool_versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "source_sha256", "calibration_sha256", "eval_sha256", "registry_version", "tool_versions",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "lineage") -> Lineage:
        data = _mapping(data, where)
        return cls(
            source_sha256=_optional(data, "source_sha256", str, where, ""),
            calibration_sha256=_optional(data, "calibration_sha256", str, where, ""),
            eval_sha256=_optional(data, "eval_sha256", str, where, ""),
            registry_version=_optional(data, "registry_version", int, where, 0),
            tool_versions={str(k): str(v) for k, v in _optional(data, "tool_versions", dict, where, {}).items()},
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source_sha256": self.source_sha256,
            "calibration_sha256": self.calibration_sha256,
            "eval_sha256": self.eval_sha256,
            "registry_version": self.registry_version,
            "tool_versions": dict(self.tool_versions),
        }
        return {**self.extra, **out}


@dataclass(frozen=True)
class RuntimeConfig:
    """How the device should run the model and what it may do when it cannot.

    ``budget_latency_ms`` and ``budget_memory_mb`` are the health check's limits on the device;
    ``deadline_ms`` is the per-request deadline after which the agent falls back to the cloud;
    ``deterministic`` allows caching results by input hash; ``static_answer`` is the last resort of
    the fallback chain; ``confidence_threshold`` triggers a fallback below it (classification).
    """

    threads: int = 1
    deterministic: bool = True
    deadline_ms: float | None = None
    budget_latency_ms: float | None = None
    budget_memory_mb: float | None = None
    confidence_threshold: float | None = None
    static_answer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "threads", "deterministic", "deadline_ms", "budget_latency_ms", "budget_memory_mb",
        "confidence_threshold", "static_answer",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "runtime_config") -> RuntimeConfig:
        data = _mapping(data, where)
        num = (int, float)

        def opt_float(key: str) -> float | None:
            value = _optional(data, key, num, where, None)
            return None if value is None else float(value)

        return cls(
            threads=_optional(data, "threads", int, where, 1),
            deterministic=_optional(data, "deterministic", bool, where, True),
            deadline_ms=opt_float("deadline_ms"),
            budget_latency_ms=opt_float("budget_latency_ms"),
            budget_memory_mb=opt_float("budget_memory_mb"),
            confidence_threshold=opt_float("confidence_threshold"),
            static_answer=_optional(data, "static_answer", dict, where, None),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"threads": self.threads, "deterministic": self.deterministic}
        for key in self.KNOWN[2:]:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return {**self.extra, **out}


@dataclass(frozen=True)
class Readout:
    """How the model's answer is read: which output, in which form, and the class names.

    ``form`` is a converter output form (``logits``, ``probabilities``, ``binary-logit``,
    ``binary-probability``, ``multilabel-logits``, ``multilabel-probabilities``, ``labels``,
    ``values``, ``embedding``; later ones pass through as strings). ``threshold`` is a probability (binary and
    multi-label decisions); ``classes`` names the classes (or labels) in output column order.
    """

    output: str
    form: str
    threshold: float | None = None
    classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("output", "form", "threshold", "classes")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "readout") -> Readout:
        data = _mapping(data, where)
        threshold = _optional(data, "threshold", (int, float), where, None)
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise ManifestError(f"{where}.threshold: {threshold} is not a probability strictly between 0 and 1")
        classes = _optional(data, "classes", list, where, [])
        if not all(isinstance(c, str) for c in classes):
            raise ManifestError(f"{where}.classes: expected a list of strings")
        return cls(
            output=_require(data, "output", str, where),
            form=_require(data, "form", str, where),
            threshold=None if threshold is None else float(threshold),
            classes=tuple(classes),
            extra=_extra(data, cls.KNOWN),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output": self.output, "form": self.form, "classes": list(self.classes)}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return {**self.extra, **out}


@dataclass(frozen=True)
class Manifest:
    """The whole bundle description. See ``docs/bundle-format.md`` for each field."""

    name: str
    version: int
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    label: str = ""
    created_at: str = ""
    features: tuple[FeatureSpec, ...] = ()
    preprocess: tuple[Step, ...] = ()
    postprocess: tuple[Step, ...] = ()
    golden: Golden = field(default_factory=Golden)
    drift_baseline: DriftBaseline = field(default_factory=DriftBaseline)
    lineage: Lineage = field(default_factory=Lineage)
    runtime_config: RuntimeConfig = field(default_factory=RuntimeConfig)
    readout: Readout | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = (
        "format_version", "name", "version", "label", "created_at", "task", "inputs", "outputs",
        "features", "preprocess", "postprocess", "variants", "golden", "drift_baseline", "lineage",
        "runtime_config", "readout",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and validate a manifest; raise :class:`ManifestError` naming the bad field."""
        data = _mapping(data, "manifest")
        fmt = _require(data, "format_version", int, "manifest")
        if fmt < 1 or fmt > FORMAT_VERSION:
            known = f"1..{FORMAT_VERSION}"
            raise ManifestError(f"manifest.format_version: {fmt} is not supported (this reader knows {known})")
        name = _require(data, "name", str, "manifest")
        if not _NAME_RE.match(name):
            raise ManifestError(f"manifest.name: '{name}' must match {_NAME_RE.pattern}")
        version = _require(data, "version", int, "manifest")
        if version < 1:
            raise ManifestError("manifest.version: must be a positive integer")
        where = f"manifest[{name}@{version}]"
        manifest = cls(
            format_version=fmt,
            name=name,
            version=version,
            label=_optional(data, "label", str, where, ""),
            created_at=_optional(data, "created_at", str, where, ""),
            task=_one_of(_require(data, "task", str, where), TASKS, f"{where}.task"),
            inputs=_list_of(TensorSpec, data, "inputs", where, required=True),
            outputs=_list_of(TensorSpec, data, "outputs", where, required=True),
            features=_list_of(FeatureSpec, data, "features", where),
            preprocess=_list_of(Step, data, "preprocess", where),
            postprocess=_list_of(Step, data, "postprocess", where),
            variants=_list_of(Variant, data, "variants", where, required=True),
            golden=Golden.from_dict(_optional(data, "golden", dict, where, {}), f"{where}.golden"),
            drift_baseline=DriftBaseline.from_dict(
                _optional(data, "drift_baseline", dict, where, {}), f"{where}.drift_baseline"
            ),
            lineage=Lineage.from_dict(_optional(data, "lineage", dict, where, {}), f"{where}.lineage"),
            runtime_config=RuntimeConfig.from_dict(
                _optional(data, "runtime_config", dict, where, {}), f"{where}.runtime_config"
            ),
            readout=_readout(data, where),
            extra=_extra(data, cls.KNOWN),
        )
        manifest._check_consistency(where)
        return manifest

    def _check_consistency(self, where: str) -> None:
        if not self.inputs or not self.outputs:
            raise ManifestError(f"{where}: needs at least one input and one output")
        if not self.variants:
            raise ManifestError(f"{where}.variants: a bundle needs at least one variant")
        ids = [v.id for v in self.variants]
        if len(set(ids)) != len(ids):
            raise ManifestError(f"{where}.variants: duplicate variant ids {sorted(ids)}")
        paths = [f.path for v in self.variants for f in v.files]
        if len(set(paths)) != len(paths):
            raise ManifestError(f"{where}.variants: two variants list the same file path")
        for name, group in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise ManifestError(f"{where}.{name}: duplicate tensor names")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "created_at": self.created_at,
            "task": self.task,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "features": [f.to_dict() for f in self.features],
            "preprocess": [s.to_dict() for s in self.preprocess],
            "postprocess": [s.to_dict() for s in self.postprocess],
            "variants": [v.to_dict() for v in self.variants],
            "golden": self.golden.to_dict(),
            "drift_baseline": self.drift_baseline.to_dict(),
            "lineage": self.lineage.to_dict(),
            "runtime_config": self.runtime_config.to_dict(),
        }
        if self.readout is not None:
            out["readout"] = self.readout.to_dict()
        return {**self.extra, **out}

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse manifest bytes (JSON, UTF-8); malformed JSON is a :class:`ManifestError`."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"manifest: not valid UTF-8 JSON ({e})") from e
        return cls.from_dict(data)

    def to_bytes(self) -> bytes:
        """The canonical bytes of this manifest: what is hashed, signed and shipped."""
        from bundles.canonical import canonical_json

        return canonical_json(self.to_dict())

    def variant(self, variant_id: str) -> Variant:
        """The variant with ``variant_id``; a :class:`ManifestError` if there is none."""
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise ManifestError(f"{self.ref}: no variant '{variant_id}' (have {', '.join(v.id for v in self.variants)})")

    @property
    def ref(self) -> str:
        """``name@version``, the way users and logs name a bundle."""
        return f"{self.name}@{self.version}"


def _readout(data: Mapping[str, Any], where: str) -> Readout | None:
    raw = _optional(data, "readout", dict, where, None)
    return None if raw is None else Readout.from_dict(raw, f"{where}.readout")


def _list_of(kind: Any, data: Mapping[str, Any], key: str, where: str, required: bool = False) -> tuple[Any, ...]:
    raw = _require(data, key, list, where) if required else _optional(data, key, list, where, [])
    return tuple(kind.from_dict(item, f"{where}.{key}[{i}]") for i, item in enumerate(raw))


__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "STEP_OPS",
    "TARGETS",
    "TASKS",
    "DriftBaseline",
    "EncodedTensor",
    "FeatureSpec",
    "FileRef",
    "Golden",
    "GoldenCase",
    "Histogram",
    "Lineage",
    "Manifest",
    "Readout",
    "Requirements",
    "RuntimeConfig",
    "Step",
    "TensorSpec",
    "Variant",
    "ValidatedRuntime",
]
