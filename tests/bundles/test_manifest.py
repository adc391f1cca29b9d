"""The manifest model: round trips (with unknown fields at every level) and validation errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundles.canonical import canonical_json
from bundles.errors import ManifestError
from bundles.manifest import DTYPES, STEP_OPS, TARGETS, TASKS, Golden, Manifest

# --- strategies: normalised manifest dicts (what to_dict writes), with unknown fields everywhere ---

UNKNOWN_KEY = st.text(alphabet="abcdefgh_", min_size=1, max_size=6).map(lambda s: f"x-{s}")
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
NAME = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True)
FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)
SHA = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
TEXT_LIST = st.lists(st.text(max_size=6), max_size=3)


def with_unknown(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Add up to two fields no reader knows (prefixed ``x-`` so they never collide with known ones)."""
    return st.tuples(fields, st.dictionaries(UNKNOWN_KEY, JSON_VALUE, max_size=2)).map(lambda t: {**t[1], **t[0]})


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return with_unknown(st.fixed_dictionaries(required, optional=optional or {}))


@st.composite
def tensor_spec(draw: st.DrawFn, name: str) -> dict[str, Any]:
    shape = draw(st.lists(st.sampled_from([-1, 1, 2, 3, 8]), min_size=1, max_size=4))
    ranges = {str(i): [1, draw(st.integers(1, 64))] for i, d in enumerate(shape) if d == -1}
    optional = {"dim_ranges": st.just(ranges)} if ranges else {}
    return draw(obj({"name": st.just(name), "dtype": st.sampled_from(DTYPES), "shape": st.just(shape)}, optional))


@st.composite
def feature_spec(draw: st.DrawFn) -> dict[str, Any]:
    lo, hi = sorted([draw(FLOAT), draw(FLOAT)])
    required = {
        "name": NAME,
        "type": st.sampled_from(["float", "int", "category"]),
        "tensor": st.text(max_size=5),
        "index": st.integers(0, 100),
    }
    optional = {
        "min": st.just(lo),
        "max": st.just(hi),
        "categories": st.lists(st.text(max_size=4), min_size=1, max_size=3),
        "sensitive": st.just(True),
    }
    return draw(obj(required, optional))


STEP = st.tuples(st.sampled_from(STEP_OPS), st.dictionaries(UNKNOWN_KEY, JSON_VALUE, max_size=3)).map(
    lambda t: {"op": t[0], **t[1]}
)
REQUIREMENTS = obj(
    {
        "runtime": st.sampled_from(["onnxruntime", "litert", "llama_cpp"]),
        "min_runtime_version": st.from_regex(r"[0-9]{1,2}(\.[0-9]{1,2}){0,2}", fullmatch=True),
        "arch": TEXT_LIST,
        "accelerators": TEXT_LIST,
        "min_memory_mb": st.integers(0, 10_000),
        "os": TEXT_LIST,
    }
)


@st.composite
def variant(draw: st.DrawFn, vid: str) -> dict[str, Any]:
    names = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    files = [
        draw(obj({"path": st.just(f"{vid}/{n}"), "sha256": SHA, "size_bytes": st.integers(0, 2**40)})) for n in names
    ]
    required = {
        "id": st.just(vid),
        "target": st.sampled_from(TARGETS),
        "precision": st.sampled_from(["fp32", "fp16", "int8", "q4_k_m"]),
        "entry": st.just(files[0]["path"]),
        "files": st.just(files),
        "requirements": REQUIREMENTS,
        "metrics": st.dictionaries(st.text(max_size=5), JSON_VALUE, max_size=3),
        "status": st.sampled_from(["passed", "structural"]),
    }
    return draw(obj(required))


@st.composite
def encoded_tensor(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    count = 1
    for d in shape:
        count *= d
    data = draw(st.lists(st.integers(-1000, 1000), min_size=count, max_size=count))
    return draw(obj({"dtype": st.sampled_from(["int32", "int64"]), "shape": st.just(shape), "data": st.just(data)}))


GOLDEN_CASE = obj(
    {
        "inputs": st.dictionaries(NAME, encoded_tensor(), max_size=2),
        "expected": st.dictionaries(NAME, encoded_tensor(), max_size=2),
    }
)
TOLERANCE = st.fixed_dictionaries({}, optional={"atol": FLOAT, "rtol": FLOAT, "top1_agreement": FLOAT})
GOLDEN = obj(
    {"cases": st.lists(GOLDEN_CASE, max_size=2), "atol": FLOAT, "rtol": FLOAT},
    {"top1_agreement": FLOAT, "variant_tolerances": st.dictionaries(NAME, TOLERANCE, min_size=1, max_size=2)},
)


@st.composite
def histogram(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        edges = sorted(set(draw(st.lists(FLOAT, min_size=2, max_size=5, unique=True))))
        bins, optional = len(edges) - 1, {"edges": st.just(edges)}
    else:
        cats = draw(st.lists(st.text(max_size=4), min_size=1, max_size=4))
        bins, optional = len(cats), {"categories": st.just(cats)}
    freqs = st.lists(FLOAT, min_size=bins, max_size=bins)
    return draw(with_unknown(st.fixed_dictionaries({"name": NAME, "freqs": freqs, **optional})))


DRIFT = obj({"features": st.lists(histogram(), max_size=2)}, {"output": histogram()})
LINEAGE = obj(
    {
        "source_sha256": st.text(max_size=8),
        "calibration_sha256": st.text(max_size=8),
        "eval_sha256": st.text(max_size=8),
        "registry_version": st.integers(0, 100),
        "tool_versions": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    }
)
RUNTIME_CONFIG = obj(
    {"threads": st.integers(1, 8), "deterministic": st.booleans()},
    {
        "deadline_ms": FLOAT,
        "budget_latency_ms": FLOAT,
        "budget_memory_mb": FLOAT,
        "confidence_threshold": FLOAT,
        "static_answer": st.dictionaries(st.text(max_size=4), JSON_VALUE, max_size=2),
    },
)


@st.composite
def manifest_dict(draw: st.DrawFn) -> dict[str, Any]:
    in_names = draw(st.lists(NAME, min_size=1, max_size=2, unique=True))
    out_names = draw(st.lists(NAME, min_size=1, max_size=2, unique=True))
    vids = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    required = {
        "format_version": st.just(1),
        "name": NAME,
        "version": st.integers(1, 2**31),
        "label": st.text(max_size=8),
        "created_at": st.text(max_size=8),
        "task": st.sampled_from(TASKS),
        "inputs": st.tuples(*[tensor_spec(n) for n in in_names]).map(list),
        "outputs": st.tuples(*[tensor_spec(n) for n in out_names]).map(list),
        "features": st.lists(feature_spec(), max_size=2),
        "preprocess": st.lists(STEP, max_size=2),
        "postprocess": st.lists(STEP, max_size=2),
        "variants": st.tuples(*[variant(v) for v in vids]).map(list),
        "golden": GOLDEN,
        "drift_baseline": DRIFT,
        "lineage": LINEAGE,
        "runtime_config": RUNTIME_CONFIG,
    }
    return draw(obj(required))


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(manifest_dict())
def test_manifest_dict_round_trips_exactly_including_unknown_fields_at_every_level(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert Manifest.from_dict(manifest.to_dict()) == manifest


@PROPERTY
@given(manifest_dict())
def test_manifest_bytes_are_canonical_and_round_trip(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    raw = manifest.to_bytes()
    assert raw == canonical_json(data)
    assert Manifest.from_bytes(raw) == manifest
    assert Manifest.from_bytes(raw).to_bytes() == raw


def test_unknown_fields_survive_in_written_json(pristine_bundle: Any) -> None:
    manifest, _ = pristine_bundle
    data = manifest.to_dict()
    data["x-future"] = {"a": 1}
    data["variants"][0]["files"][0]["x-signed-by"] = "ci"
    data["golden"]["cases"][0]["expected"]["logits"]["x-note"] = "from torch"
    data["drift_baseline"]["features"][0]["x-bins"] = "quantile"
    text = Manifest.from_dict(data).to_bytes().decode()
    for needle in ('"x-future":{"a":1}', '"x-signed-by":"ci"', '"x-note":"from torch"', '"x-bins":"quantile"'):
        assert needle in text


def test_golden_tolerance_for_prefers_the_variant_override() -> None:
    golden = Golden(atol=1e-4, rtol=1e-3, top1_agreement=None, variant_tolerances={"int8": {"atol": 0.5}})
    assert golden.tolerance_for("int8") == (0.5, 1e-3, None)
    assert golden.tolerance_for("fp32") == (1e-4, 1e-3, None)


# --- validation errors: each names the bad field ---------------------------------------------------


def _edit(path: list[Any], value: Any) -> Any:
    def apply(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


_DELETE = object()

INVALID = [
    ("format_version too new", _edit(["format_version"], 99), "format_version: 99 is not supported"),
    ("format_version missing", _edit(["format_version"], _DELETE), "missing required field 'format_version'"),
    ("bad name", _edit(["name"], "Bad Name"), "manifest.name: 'Bad Name' must match"),
    ("version zero", _edit(["version"], 0), "manifest.version: must be a positive integer"),
    ("version is a bool", _edit(["version"], True), "expected a number, got a boolean"),
    ("unknown task", _edit(["task"], "magic"), ".task: 'magic' is not one of"),
    ("no inputs", _edit(["inputs"], []), "needs at least one input and one output"),
    ("no variants", _edit(["variants"], []), "a bundle needs at least one variant"),
    ("bad dtype", _edit(["inputs", 0, "dtype"], "float128"), "dtype: 'float128' is not one of"),
    ("zero dimension", _edit(["inputs", 0, "shape"], [0, 4]), "dimensions must be positive integers or -1"),
    ("bad dim range", _edit(["inputs", 0, "dim_ranges"], {"0": [5, 2]}), "expected [min, max] with 0 < min <= max"),
    ("feature min > max", _edit(["features", 0, "min"], 9.0), "min 9.0 is greater than max 5.0"),
    ("unknown step op", _edit(["postprocess", 0, "op"], "sharpen"), "op: 'sharpen' is not one of"),
    ("unknown target", _edit(["variants", 0, "target"], "tensorrt"), "target: 'tensorrt' is not one of"),
    ("bad status", _edit(["variants", 0, "status"], "maybe"), "status: 'maybe' is not one of"),
    ("traversal path", _edit(["variants", 0, "files", 0, "path"], "../x.onnx"), "is not a safe relative POSIX path"),
    ("absolute path", _edit(["variants", 0, "entry"], "/etc/passwd"), "is not a safe relative POSIX path"),
    ("bad sha", _edit(["variants", 0, "files", 0, "sha256"], "ABC"), "not a lowercase hex sha256"),
    ("negative size", _edit(["variants", 0, "files", 0, "size_bytes"], -1), "size_bytes: negative"),
    ("no files", _edit(["variants", 0, "files"], []), "a variant needs at least one file"),
    ("duplicate variant", _edit(["variants", 1, "id"], "onnx-fp32"), "duplicate variant ids"),
    ("missing runtime", _edit(["variants", 0, "requirements", "runtime"], _DELETE), "missing required field 'runtime'"),
    (
        "golden count mismatch",
        _edit(["golden", "cases", 0, "expected", "logits", "shape"], [7, 3]),
        "shape [7, 3] needs 21 values, got 6",
    ),
    ("bad tolerance key", _edit(["golden", "variant_tolerances"], {"a": {"slack": 1}}), "unknown keys ['slack']"),
    ("histogram bins", _edit(["drift_baseline", "features", 0, "freqs"], [1.0]), "1 frequencies do not match 8 bins"),
    ("threads not int", _edit(["runtime_config", "threads"], "two"), "threads: expected int, got str"),
]


@pytest.mark.parametrize(("case", "edit", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected_with_a_message_naming_the_field(
    pristine_bundle: Any, case: str, edit: Any, message: str
) -> None:
    manifest, _ = pristine_bundle
    data = copy.deepcopy(manifest.to_dict())
    edit(data)
    with pytest.raises(ManifestError) as excinfo:
        Manifest.from_dict(data)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[]", b"null"])
def test_manifest_bytes_that_are_not_a_json_object_are_rejected(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw)


def test_variant_lookup_names_the_available_variants(pristine_bundle: Any) -> None:
    manifest, _ = pristine_bundle
    assert manifest.variant("onnx-fp16").precision == "fp16"
    with pytest.raises(ManifestError, match="no variant 'tflite-int8' \\(have onnx-fp32, onnx-fp16\\)"):
        manifest.variant("tflite-int8")


def test_manifest_json_is_readable_by_plain_json(pristine_bundle: Any) -> None:
    manifest, root = pristine_bundle
    assert json.loads((root / "manifest.json").read_bytes()) == manifest.to_dict()
