"""The digits CNN converted once to ONNX, TFLite and Core ML (``digits_all_targets``, tests/conftest.py).

TFLite variants are gated in LiteRT and in tflite-runtime 2.14 (its own environment, driven by a
worker process); the requirements list exactly the runtimes each variant passed on. Core ML is
validated structurally on this Linux host and never called "passed".
"""

from __future__ import annotations

import json
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.archive import open_bundle
from bundles.errors import NoCompatibleVariantError, RuntimeUnavailableError
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from bundles.selection import DeviceCapabilities, rejection_reasons, select_variant, validated_runtime_for
from tests.conftest import ConvertedDigits

LITERT = metadata.version("ai-edge-litert")


@pytest.fixture(scope="module")
def results(digits_all_targets: ConvertedDigits) -> dict[str, dict[str, Any]]:
    saved = json.loads(digits_all_targets.results_json.read_text())
    return {r["variant_id"]: r for r in saved["results"]}


@pytest.fixture(scope="module")
def bundle(digits_all_targets: ConvertedDigits, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    return open_bundle(digits_all_targets.bundle, tmp_path_factory.mktemp("all-targets") / "unpacked")


def _caps(**runtimes: str) -> DeviceCapabilities:
    return DeviceCapabilities(arch="x86_64", os="linux", runtimes=dict(runtimes))


def test_tflite_fp32_fp16_and_int8_pass_in_litert_and_in_tflite_runtime(
    results: dict[str, dict[str, Any]], bundle: tuple[Manifest, Path]
) -> None:
    manifest, _ = bundle
    for precision in ("fp32", "fp16", "int8-weight", "int8-static"):
        result = results[f"tflite-{precision}"]
        assert result["status"] == "passed", result
        assert {name: r["status"] for name, r in result["runtimes"].items()} == {
            "litert": "passed", "tflite_runtime": "passed",
        }, result["runtimes"]  # fmt: skip
        assert result["runtimes"]["tflite_runtime"]["version"] == "2.14.0"
        assert result["metrics"]["metric_drop"] <= 0.01
        validated = manifest.variant(f"tflite-{precision}").requirements.validated_runtimes
        assert [(v.runtime, v.version) for v in validated] == [("litert", LITERT), ("tflite_runtime", "2.14.0")]
    assert results["tflite-int8-static"]["metrics"]["size_ratio_to_fp32"] < 0.35


def test_dynamic_int8_is_refused_for_tflite_runtime_by_its_measured_accuracy(
    results: dict[str, dict[str, Any]], bundle: tuple[Manifest, Path]
) -> None:
    result = results["tflite-int8-dynamic"]
    old, new = result["runtimes"]["tflite_runtime"], result["runtimes"]["litert"]
    source = result["metrics"]["source_metric_value"]
    print(f"tflite-int8-dynamic: accuracy {new['metric_value']:.4f} in litert {new['version']}, "
          f"{old['metric_value']:.4f} in tflite_runtime {old['version']} (source {source:.4f})")  # fmt: skip
    assert new["status"] == "passed" and old["status"] == "refused"
    assert old["metric_value"] < 0.5 < new["metric_value"], "the old runtime computes garbage without an error"
    assert any(f"accuracy {old['metric_value']:.4f} vs source" in reason for reason in old["reasons"]), old
    assert any(note.startswith("not validated on tflite_runtime 2.14.0: accuracy") for note in result["notes"])
    manifest, _ = bundle
    variant = manifest.variant("tflite-int8-dynamic")
    assert [v.runtime for v in variant.requirements.validated_runtimes] == ["litert"]
    old_device = _caps(tflite_runtime="2.14.0")
    assert rejection_reasons(variant, old_device) == [
        f"validated only on litert {LITERT} (this device has tflite_runtime 2.14.0)"
    ]
    chosen = select_variant(manifest, old_device)
    assert chosen.target == "tflite" and chosen.id != "tflite-int8-dynamic"
    assert validated_runtime_for(chosen, old_device) == "tflite_runtime"


def test_a_device_with_only_litert_gets_a_tflite_variant_and_a_rollout_can_prefer_tflite(
    bundle: tuple[Manifest, Path],
) -> None:
    manifest, _ = bundle
    only_litert = _caps(litert=LITERT)
    chosen = select_variant(manifest, only_litert)
    assert chosen.target == "tflite" and validated_runtime_for(chosen, only_litert) == "litert"
    both = _caps(litert=LITERT, onnxruntime=metadata.version("onnxruntime"))
    assert select_variant(manifest, both.with_preferences(("tflite",))).target == "tflite"
    assert select_variant(manifest, both.with_preferences(("onnx",))).target == "onnx"
    other_series = _caps(litert="2.2.0")
    assert all("validated only on" in " ".join(rejection_reasons(v, other_series))
               for v in manifest.variants if v.target == "tflite")  # fmt: skip
    with pytest.raises(NoCompatibleVariantError, match="tflite-fp32: validated only on litert"):
        select_variant(manifest, other_series)


def test_the_predictor_quantises_int8_model_io_from_the_tensors_own_parameters(
    digits_all_targets: ConvertedDigits, results: dict[str, dict[str, Any]], bundle: tuple[Manifest, Path]
) -> None:
    manifest, root = bundle
    eval_x, eval_y = digits_all_targets.cnn.eval_x, digits_all_targets.cnn.eval_y
    with Predictor.load(manifest, root, variant="tflite-int8-static", caps=_caps(litert=LITERT)) as predictor:
        model_input = predictor.runtime._inputs["x"]  # type: ignore[attr-defined]
        model_output = predictor.runtime._outputs["logits"]  # type: ignore[attr-defined]
        assert model_input.dtype == np.int8 and model_input.scale > 0
        assert model_output.dtype == np.int8 and model_output.scale > 0
        assert predictor.self_test().passed
        chunks = [predictor.predict({"x": eval_x[i : i + 32]}).raw["logits"] for i in range(0, len(eval_x), 32)]
    logits = np.concatenate(chunks)
    assert logits.dtype == np.float32
    accuracy = float(np.mean(logits.argmax(axis=1) == eval_y))
    assert accuracy == pytest.approx(results["tflite-int8-static"]["metrics"]["metric_value"], abs=1e-9)


def test_a_tflite_model_with_a_fixed_batch_serves_any_batch_row_by_row(
    digits_all_targets: ConvertedDigits, results: dict[str, dict[str, Any]], bundle: tuple[Manifest, Path]
) -> None:
    assert results["tflite-fp32"]["metrics"]["batch"].startswith("fixed at 1, run row by row")
    manifest, root = bundle
    x = digits_all_targets.cnn.eval_x[:32]
    with Predictor.load(manifest, root, variant="tflite-fp32", caps=_caps(litert=LITERT)) as lite:
        assert lite.runtime_name == "litert"
        from_tflite = lite.predict({"x": x}).raw["logits"]
    with Predictor.load(manifest, root, variant="onnx-fp32") as onnx:
        from_onnx = onnx.predict({"x": x}).raw["logits"]
    assert from_tflite.shape == (32, 10)
    np.testing.assert_allclose(from_tflite, from_onnx, atol=1e-4)


def test_coreml_variants_are_structurally_valid_with_their_compression_present(
    results: dict[str, dict[str, Any]], bundle: tuple[Manifest, Path]
) -> None:
    manifest, _ = bundle
    expected_ops = {"int8-weight": "constexpr_affine_dequantize", "int4-palette": "constexpr_lut_to_dense"}
    fp32_weights = results["coreml-fp32"]["metrics"]["weights_bytes"]
    for precision in ("fp32", "fp16", "int8-weight", "int4-palette"):
        result = results[f"coreml-{precision}"]
        variant = manifest.variant(f"coreml-{precision}")
        assert result["status"] == variant.status == "structural", result
        assert any("structurally valid, not executed on this host" in note for note in result["notes"])
        metrics = variant.metrics
        assert metrics["model_type"] == "mlProgram" and metrics["spec_version"] >= 7
        assert variant.requirements.runtime == "coreml" and variant.requirements.os == ("darwin",)
        assert variant.requirements.deployment_target == "macOS13"
        assert not variant.requirements.validated_runtimes  # executed nowhere
        if precision in expected_ops:
            assert metrics["ops"].get(expected_ops[precision], 0) >= 1, metrics["ops"]
        errors = metrics["weight_errors"]
        assert set(errors) == {"c1.weight", "c2.weight", "f1.weight", "f2.weight"}
        assert all(e["max_abs_error"] <= e["allowed"] for e in errors.values()), errors
    assert results["coreml-int8-weight"]["metrics"]["weights_bytes"] < 0.3 * fp32_weights
    assert results["coreml-int4-palette"]["metrics"]["weights_bytes"] < 0.17 * fp32_weights
    assert max(e["max_abs_error"] for e in results["coreml-int4-palette"]["metrics"]["weight_errors"].values()) > 1e-3


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS runs Core ML: the refusal is for other hosts")
def test_the_predictor_refuses_core_ml_off_macos_with_the_reason(bundle: tuple[Manifest, Path]) -> None:
    manifest, root = bundle
    with pytest.raises(RuntimeUnavailableError, match="Core ML executes models only on macOS"):
        Predictor.load(manifest, root, variant="coreml-fp16")
    assert all(v.target != "coreml" for v in [select_variant(manifest, _caps(onnxruntime="1.32.0"))])


def test_the_coreml_package_is_normalised_for_reproducible_bytes(bundle: tuple[Manifest, Path]) -> None:
    from coremltools.proto import Model_pb2

    manifest, root = bundle
    package = root / manifest.variant("coreml-fp16").entry
    items = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"]
    assert {key: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgefleet:" + item["path"])) for key, item in items.items()} == {
        key: key for key in items
    }
    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    assert "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined
    array = spec.description.input[0].type.multiArrayType
    assert array.dataType == array.FLOAT32  # fp16 precision did not turn the input to FLOAT16


def test_the_report_compares_every_executed_variant_with_the_source_and_each_other(
    digits_all_targets: ConvertedDigits,
) -> None:
    agreement = json.loads(digits_all_targets.results_json.read_text())["agreement"]
    rows = {row["label"]: row for row in agreement["vs_source"]}
    assert {"onnx-fp32@onnxruntime", "tflite-fp32@litert", "tflite-fp32@tflite_runtime"} <= set(rows)
    assert not any(label.startswith("coreml") for label in rows)  # not executed on this host
    assert rows["tflite-int8-dynamic@tflite_runtime"]["top1_agreement"] < 0.5
    assert rows["tflite-fp32@litert"]["top1_agreement"] == 1.0 and rows["tflite-fp32@litert"]["max_abs_diff"] < 1e-3
    labels = agreement["labels"]
    assert labels[0] == "source" and len(agreement["top1_agreement"]) == len(labels)
    i, j = labels.index("tflite-int8-weight@litert"), labels.index("onnx-fp32@onnxruntime")
    assert agreement["top1_agreement"][i][j] == agreement["top1_agreement"][j][i] > 0.95
    report = (digits_all_targets.report_dir / "report.md").read_text()
    assert "## Cross-target agreement" in report and "tflite-int8-dynamic@tflite_runtime 2.14.0 | refused" in report
    assert (digits_all_targets.report_dir / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert "coreml-fp16 | structural" in report


def test_int16_model_io_is_quantised_from_the_tensors_parameters_in_both_runtimes(
    digits_all_targets: ConvertedDigits, bundle: tuple[Manifest, Path], tmp_path: Path
) -> None:
    """static int8 weights with int16 activations (built by name: ``int8-static-a16``) in LiteRT and tflite-runtime."""
    from bundles.runtimes.litert import LiteRtRuntime
    from converter.datasets import load_dataset
    from converter.exporters.tflite import quantise
    from converter.spec import parse_input_spec
    from converter.workers import RuntimeWorker

    manifest, root = bundle
    calibration = load_dataset(digits_all_targets.cnn.calibration, parse_input_spec("x: float32[-1,1,8,8]"), "y", "c")
    out = tmp_path / "a16.tflite"
    quantise(root / manifest.variant("tflite-fp32").entry, "int8-static-a16", out, calibration, tmp_path / "log")
    x = digits_all_targets.cnn.eval_x[:40]
    fp32 = LiteRtRuntime.load(root / manifest.variant("tflite-fp32").entry).run({"x": x})["logits"]
    lite = LiteRtRuntime.load(out)
    assert lite._inputs["x"].dtype == np.int16 and lite._outputs["logits"].dtype == np.int16
    worker = RuntimeWorker("tflite_runtime", tmp_path / "worker")
    try:
        for logits in (lite.run({"x": x})["logits"], worker.load("tflite", out).run({"x": x})["logits"]):
            assert logits.dtype == np.float32
            assert float(np.mean(logits.argmax(axis=1) == fp32.argmax(axis=1))) >= 0.95
    finally:
        worker.close()
