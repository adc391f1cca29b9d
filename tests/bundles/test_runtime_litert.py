"""The LiteRT runtime on real TFLite flatbuffers (built in the test from the same weights as ONNX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bundles.errors import InferenceError, RuntimeUnavailableError
from bundles.predictor import Predictor
from bundles.runtimes.litert import LiteRtRuntime
from bundles.testing import build_bundle_dir, make_tflite_classifier, reference_classifier

X = np.random.default_rng(5).uniform(-2, 2, size=(4, 4)).astype(np.float32)


def test_a_tflite_variant_predicts_batches_and_passes_its_self_test(tmp_path: Path) -> None:
    manifest = build_bundle_dir(tmp_path / "b", tflite=True)
    with Predictor.load(manifest, tmp_path / "b", variant="tflite-fp32", threads=2) as lite:
        assert lite.runtime.name == "litert"
        report = lite.self_test()
        assert report.passed and report.max_abs_error["logits"] < 1e-4
        np.testing.assert_allclose(lite.predict({"x": X}).raw["logits"], reference_classifier().logits(X), atol=1e-5)
        results = lite.predict_batch([{"x": X[:1]}, {"x": X[1:]}])
        assert [r.outputs["label"].shape for r in results] == [(1,), (3,)]
    with Predictor.load(manifest, tmp_path / "b", variant="onnx-fp32") as onnx:
        np.testing.assert_array_equal(
            onnx.predict({"x": X}).outputs["label"],
            results[0].outputs["label"].tolist() + results[1].outputs["label"].tolist(),
        )


@pytest.mark.parametrize("signature", [True, False])
def test_tensors_are_found_with_or_without_a_signature(tmp_path: Path, signature: bool) -> None:
    model = make_tflite_classifier(tmp_path / "m.tflite", seed=2, signature=signature)
    runtime = LiteRtRuntime.load(tmp_path / "m.tflite")
    assert runtime.input_names == ("x",) and runtime.output_names == ("logits",)
    np.testing.assert_allclose(runtime.run({"x": X})["logits"], model.logits(X), atol=1e-5)
    # the request's float64 is cast to the model's float32; a tensor the model does not have is refused
    np.testing.assert_allclose(runtime.run({"x": X.astype(np.float64)})["logits"], model.logits(X), atol=1e-5)
    with pytest.raises(InferenceError, match="litert cannot take these inputs for m.tflite"):
        runtime.run({"pixels": X})
    runtime.close()


def test_a_file_that_is_not_a_tflite_model_is_runtime_unavailable(tmp_path: Path) -> None:
    (tmp_path / "bad.tflite").write_bytes(b"TFL3 but not really")
    with pytest.raises(RuntimeUnavailableError, match="litert cannot load bad.tflite"):
        LiteRtRuntime.load(tmp_path / "bad.tflite")
