"""The Predictor on real ONNX models in ONNX Runtime: predictions, batches, checks, self-tests."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.errors import (
    InputError,
    IntegrityError,
    ManifestError,
    NoCompatibleVariantError,
    RuntimeUnavailableError,
    SelfTestError,
)
from bundles.manifest import Manifest, Requirements, Step, TensorSpec
from bundles.predictor import Predictor
from bundles.selection import DeviceCapabilities
from bundles.testing import build_bundle_dir, golden_inputs, reference_classifier, with_golden_offset

Bundle = tuple[Manifest, Path]
REFERENCE = reference_classifier()
X = np.random.default_rng(3).uniform(-2, 2, size=(6, 4)).astype(np.float32)


@pytest.fixture()
def predictor(pristine_bundle: Bundle) -> Any:
    manifest, root = pristine_bundle
    with Predictor.load(manifest, root, variant="onnx-fp32") as loaded:
        yield loaded


def test_predict_gives_the_models_logits_and_post_processed_labels(predictor: Predictor) -> None:
    result = predictor.predict({"x": X})
    np.testing.assert_allclose(result.raw["logits"], REFERENCE.logits(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    expected_labels = [f"c{i}" for i in REFERENCE.logits(X).argmax(axis=1)]
    assert result.outputs["label"].tolist() == expected_labels
    assert result.outputs["logits"] is result.raw["logits"]


def test_predict_batch_stacks_requests_into_one_model_call(predictor: Predictor) -> None:
    requests = [{"x": X[:1]}, {"x": X[1:4]}, {"x": X[4:]}]
    calls: list[int] = []
    run = predictor.runtime.run

    def counting_run(feeds: Any) -> Any:
        calls.append(feeds["x"].shape[0])
        return run(feeds)

    predictor.runtime.run = counting_run  # type: ignore[method-assign]
    results = predictor.predict_batch(requests)
    assert calls == [6]
    assert [r.raw["logits"].shape[0] for r in results] == [1, 3, 2]
    for request, result in zip(requests, results, strict=True):
        alone = predictor.predict(request)
        np.testing.assert_allclose(result.raw["logits"], alone.raw["logits"], rtol=1e-6)
        assert result.outputs["label"].tolist() == alone.outputs["label"].tolist()


def test_predict_batch_loops_when_the_batch_dimension_is_fixed(tmp_path: Path) -> None:
    manifest = build_bundle_dir(tmp_path / "static", dynamic_batch=False)
    with Predictor.load(manifest, tmp_path / "static") as static:
        assert not static.dynamic_batch
        results = static.predict_batch([{"x": X[i : i + 1]} for i in range(3)])
        np.testing.assert_allclose(
            np.concatenate([r.raw["logits"] for r in results]), REFERENCE.logits(X[:3]), rtol=1e-5, atol=1e-5
        )
        with pytest.raises(InputError, match=r"shape \[2, 4\] does not match \[1, 4\]"):
            static.predict({"x": X[:2]})
        static.self_test()


def test_run_model_skips_pre_and_post_processing(predictor: Predictor) -> None:
    assert set(predictor.run_model({"x": X})) == {"logits"}


def test_inputs_close_enough_in_kind_are_converted(predictor: Predictor) -> None:
    as_float64 = predictor.predict({"x": X.astype(np.float64)})
    as_list = predictor.predict({"x": X.tolist()})
    np.testing.assert_array_equal(as_float64.raw["logits"], as_list.raw["logits"])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input 'x' \\(the model takes x\\)"),
        ({"X": X}, "missing input 'x'"),
        ({"x": X[0]}, r"shape \[4\] does not match \['\?', 4\]"),
        ({"x": X[:, :3]}, r"shape \[6, 3\] does not match \['\?', 4\]"),
        ({"x": np.array([["a"] * 4])}, "dtype <U1 cannot be used as float32"),
        ({"x": X.astype(np.complex64)}, "dtype complex64 cannot be used as float32"),
    ],
)
def test_inputs_that_do_not_match_the_schema_are_an_input_error(
    predictor: Predictor, inputs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        predictor.predict(inputs)


def test_batches_that_cannot_be_stacked_are_an_input_error(predictor: Predictor) -> None:
    with pytest.raises(InputError, match="same input names"):
        predictor.predict_batch([{"x": X}, {"y": X}])
    with pytest.raises(InputError, match="cannot be stacked"):
        predictor.predict_batch([{"x": X}, {"x": X[:, :2]}])


def test_pre_processing_from_the_manifest_runs_before_the_model(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    halved = dataclasses.replace(manifest, preprocess=(Step("scale", {"factor": 0.5}),))
    with Predictor.load(halved, root, variant="onnx-fp32") as predictor:
        np.testing.assert_allclose(
            predictor.predict({"x": X}).raw["logits"], REFERENCE.logits(X * 0.5), rtol=1e-5, atol=1e-5
        )


# --- self-test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant_id", ["onnx-fp32", "onnx-fp16"])
def test_self_test_passes_on_a_good_bundle_and_reports_the_errors(pristine_bundle: Bundle, variant_id: str) -> None:
    manifest, root = pristine_bundle
    with Predictor.load(manifest, root, variant=variant_id) as predictor:
        report = predictor.self_test()
    assert report.passed and report.cases == 3 and report.failures == ()
    assert report.variant == variant_id and report.bundle == "tiny@1"
    assert 0.0 <= report.max_abs_error["logits"] < 1e-2
    assert report.top1_agreement == 1.0
    assert report.to_dict()["max_abs_error"] == report.max_abs_error


def test_self_test_fails_clearly_when_golden_outputs_were_altered(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    altered = with_golden_offset(manifest, 0.25)
    with Predictor.load(altered, root, variant="onnx-fp32") as predictor:
        with pytest.raises(SelfTestError) as excinfo:
            predictor.self_test()
    message = str(excinfo.value)
    assert message.startswith("tiny@1 variant onnx-fp32: self-test failed: golden case 0 output 'logits'")
    assert "max abs error 0.25 exceeds atol 0.01 + rtol 0.01*|expected|" in message
    assert "(and 2 more)" in message
    report = excinfo.value.report
    assert report is not None and not report.passed  # type: ignore[attr-defined]
    assert report.max_abs_error["logits"] == pytest.approx(0.25, abs=1e-6)  # type: ignore[attr-defined]


def test_self_test_checks_top1_agreement(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    case = manifest.golden.cases[0]
    expected = case.expected["logits"]
    rows = np.asarray(expected.data, dtype=np.float32).reshape(expected.shape)
    swapped = rows[:, ::-1].copy()  # other argmax per row, same magnitudes
    moved = dataclasses.replace(expected, data=tuple(swapped.reshape(-1).tolist()))
    golden = dataclasses.replace(
        manifest.golden,
        cases=(dataclasses.replace(case, expected={"logits": moved}),),
        atol=100.0,  # values are within tolerance, only the ranking moved
    )
    with Predictor.load(dataclasses.replace(manifest, golden=golden), root, variant="onnx-fp32") as predictor:
        with pytest.raises(SelfTestError, match="top-1 agreement 0.0000 is below the required 1.0"):
            predictor.self_test()


def test_a_variant_tolerance_override_applies_to_that_variant_only(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    altered = with_golden_offset(manifest, 0.25)
    loose = dataclasses.replace(altered.golden, variant_tolerances={"onnx-fp16": {"atol": 0.5}})
    relaxed = dataclasses.replace(altered, golden=loose)
    with Predictor.load(relaxed, root, variant="onnx-fp16") as fp16:
        assert fp16.self_test().atol == 0.5
    with Predictor.load(relaxed, root, variant="onnx-fp32") as fp32, pytest.raises(SelfTestError):
        fp32.self_test()


def test_self_test_reports_a_missing_expected_output(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    case = manifest.golden.cases[0]
    renamed = dataclasses.replace(case, expected={"scores": case.expected["logits"]})
    golden = dataclasses.replace(manifest.golden, cases=(renamed,))
    with Predictor.load(dataclasses.replace(manifest, golden=golden), root, variant="onnx-fp32") as predictor:
        with pytest.raises(SelfTestError, match="output 'scores': the model did not produce it"):
            predictor.self_test()


# --- loading ------------------------------------------------------------------------------------


def test_load_picks_the_best_variant_for_the_given_capabilities(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    caps = DeviceCapabilities(arch="x86_64", os="linux", runtimes={"onnxruntime": "1.32.0"}, preferences=("fp16",))
    with Predictor.load(manifest, root, caps=caps) as predictor:
        assert predictor.variant.id == "onnx-fp16"
    with Predictor.load(manifest, root) as on_this_host:
        assert on_this_host.variant.id in {"onnx-fp32", "onnx-fp16"}
    with pytest.raises(NoCompatibleVariantError):
        Predictor.load(manifest, root, caps=dataclasses.replace(caps, runtimes={}))


def test_load_refuses_a_model_file_with_a_flipped_byte(bundle: Bundle) -> None:
    manifest, root = bundle
    model = root / manifest.variant("onnx-fp32").entry
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="onnx-fp32/model.onnx"):
        Predictor.load(manifest, root, variant="onnx-fp32")


def test_threads_reach_the_runtime(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    with Predictor.load(manifest, root, variant="onnx-fp32", threads=2) as predictor:
        assert predictor.runtime.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
    with Predictor.load(manifest, root, variant="onnx-fp32") as default:
        assert default.threads == manifest.runtime_config.threads


def test_a_manifest_that_disagrees_with_the_model_is_refused(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    renamed = dataclasses.replace(manifest, inputs=(TensorSpec("pixels", "float32", (-1, 4)),))
    with pytest.raises(ManifestError, match=r"inputs \['x'\].*differ from the manifest's \(inputs \['pixels'\]"):
        Predictor.load(renamed, root, variant="onnx-fp32")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS executes Core ML: the refusal is for other hosts")
def test_a_coreml_variant_is_refused_off_macos_with_the_reason(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    requirements = Requirements(runtime="coreml", os=("darwin",), deployment_target="macOS13")
    coreml = dataclasses.replace(manifest.variants[0], target="coreml", requirements=requirements, status="structural")
    with pytest.raises(RuntimeUnavailableError, match="Core ML executes models only on macOS .*runtime coreml is not"):
        Predictor.load(dataclasses.replace(manifest, variants=(coreml,)), root, variant=coreml.id)


def test_a_runtime_that_cannot_run_the_target_is_refused(tmp_path: Path) -> None:
    from bundles.runtimes.base import load_runtime

    with pytest.raises(RuntimeUnavailableError, match="runtime 'onnxruntime' cannot run target 'tflite'"):
        load_runtime("tflite", tmp_path / "model.tflite", runtime="onnxruntime")
    with pytest.raises(RuntimeUnavailableError, match="no runtime for target 'safetensors'"):
        load_runtime("safetensors", tmp_path / "model.safetensors")
    with pytest.raises(RuntimeUnavailableError, match="runtime 'onnxruntime' cannot run target 'gguf'"):
        load_runtime("gguf", tmp_path / "model.gguf", runtime="onnxruntime")


def test_a_file_the_runtime_cannot_load_is_runtime_unavailable(tmp_path: Path) -> None:
    from bundles.runtimes.onnxruntime import OnnxRuntime

    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeUnavailableError, match="cannot load model.onnx"):
        OnnxRuntime.load(tmp_path / "model.onnx")


def test_golden_inputs_reproduce_the_golden_outputs(pristine_bundle: Bundle) -> None:
    manifest, root = pristine_bundle
    with Predictor.load(manifest, root, variant="onnx-fp32") as predictor:
        for inputs, case in zip(golden_inputs(manifest), manifest.golden.cases, strict=True):
            expected = np.asarray(case.expected["logits"].data, dtype=np.float32).reshape(case.expected["logits"].shape)
            np.testing.assert_allclose(predictor.run_model(inputs)["logits"], expected, rtol=1e-6, atol=1e-6)


def test_from_dir_reads_the_manifest_and_checks_its_hash(pristine_bundle: Bundle) -> None:
    from bundles.canonical import sha256_bytes

    manifest, root = pristine_bundle
    with Predictor.from_dir(root, variant="onnx-fp16", expected_manifest_sha256=sha256_bytes(manifest.to_bytes())) as p:
        assert p.manifest == manifest and p.variant.id == "onnx-fp16"
    with pytest.raises(IntegrityError, match="manifest.json"):
        Predictor.from_dir(root, expected_manifest_sha256="0" * 64)
