"""scikit-learn models as users bring them: string class labels, multi-class gradient boosting,
pipelines with preprocessing, classifiers without ``predict_proba``; each converted, its metric
recomputed from the bundle's files, and its golden self-test passing on a device's Predictor."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from bundles.archive import open_bundle
from bundles.predictor import Predictor
from tests.converter.helpers import cli, ok
from tests.converter.recompute import assert_reported_metric, latest

IRIS_NAMES = ("setosa", "versicolor", "virginica")


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y


def _register_sklearn(name: str, model: object, x: np.ndarray, y: np.ndarray, tmp_path: Path, *extra: str) -> str:
    (tmp_path / f"{name}.pkl").write_bytes(pickle.dumps(model))
    np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    return ok("register", name, "--source", tmp_path / f"{name}.pkl", "--input", f"x: float32[-1,{x.shape[1]}]",
              "--task", "classification", "--eval", tmp_path / f"{name}.npz", *extra)  # fmt: skip


def test_a_classifier_trained_on_string_labels_keeps_them_in_the_manifest(
    home: Path, iris: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = iris
    names = np.array(IRIS_NAMES)[y]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x[::2], names[::2])
    out = _register_sklearn("species", pipeline, x[1::2], names[1::2], tmp_path)
    assert "reads output 'probabilities' as probabilities (3 classes)" in out
    ok("convert", "species", "--targets", "onnx,ort", "--quantize", "fp32")
    manifest = assert_reported_metric(
        home, "species", {"x": x[1::2]},
        lambda o: accuracy_score(names[1::2], np.array(IRIS_NAMES)[np.argmax(o["probabilities"], axis=1)]), tmp_path,
    )  # fmt: skip
    assert manifest.readout is not None and manifest.readout.classes == IRIS_NAMES
    assert {t.name: t.dtype for t in manifest.outputs} == {"label": "string", "probabilities": "float32"}
    output = manifest.drift_baseline.output
    assert output is not None and output.name == "label" and output.categories == IRIS_NAMES
    _, archive = latest(home, "species")
    manifest, bundle_dir = open_bundle(archive, tmp_path / "device")
    for variant in manifest.variants:
        with Predictor.load(manifest, bundle_dir, variant=variant.id) as predictor:
            assert predictor.self_test().passed
            answer = predictor.predict({"x": x[1:4:2]}).outputs["label"]
            assert answer.tolist() == pipeline.predict(x[1:4:2]).tolist()


def test_multi_class_gradient_boosting_converts(
    home: Path, iris: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = iris
    model = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0).fit(x[::2], y[::2])
    _register_sklearn("boosted", model, x[1::2], y[1::2], tmp_path)
    ok("convert", "boosted", "--targets", "onnx", "--quantize", "fp32")
    results, _ = latest(home, "boosted")
    assert results["onnx-fp32"]["metrics"]["max_abs_error"] < 1e-5
    assert_reported_metric(
        home, "boosted", {"x": x[1::2]}, lambda o: accuracy_score(y[1::2], np.argmax(o["probabilities"], 1)), tmp_path
    )


def test_classifiers_without_predict_proba_are_read_through_their_decision_function(home: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.svm import SVC, LinearSVC

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinearSVC convergence on unscaled data is not the point here
        linear = LinearSVC(max_iter=2000).fit(x[::2], y[::2])
    out = _register_sklearn("linear", linear, x[1::2], y[1::2], tmp_path)
    assert "reads output 'probabilities' as binary-logit (2 classes)" in out  # one decision value per row
    ok("convert", "linear", "--targets", "onnx", "--quantize", "fp32")
    assert_reported_metric(home, "linear", {"x": x[1::2]},
                           lambda o: accuracy_score(y[1::2], o["probabilities"][:, 0] >= 0), tmp_path)  # fmt: skip
    svc = SVC().fit(x[::2], y[::2])
    out = _register_sklearn("svc", svc, x[1::2], y[1::2], tmp_path)
    # a binary SVC's export lays its decision out as [d, -d]: argmax would pick the other class, so the
    # metric reads what the model predicts itself
    assert "reads output 'label' as labels (2 classes)" in out
    ok("convert", "svc", "--targets", "onnx", "--quantize", "fp32")
    results, _ = latest(home, "svc")
    assert results["onnx-fp32"]["metrics"]["max_abs_error"] < 1e-4  # the [d, -d] scores match scikit-learn's too
    assert results["onnx-fp32"]["metrics"]["metric_value"] > 0.9
    assert_reported_metric(home, "svc", {"x": x[1::2]}, lambda o: accuracy_score(y[1::2], o["label"]), tmp_path)


def test_a_pipeline_with_preprocessing_is_quantised_after_its_scaler(home: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = MLPClassifier((64,), max_iter=60, random_state=0)
        model = make_pipeline(StandardScaler(), mlp).fit(x[:1200], y[:1200])
    _register_sklearn("scaled", model, x[1200:], y[1200:], tmp_path, "--prefer", "size", "--max-drop", "0.02")
    ok("convert", "scaled", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "scaled")
    assert results["onnx-int8-dynamic"]["status"] == "passed", results["onnx-int8-dynamic"]["reasons"]
    assert results["onnx-int8-dynamic"]["metrics"]["size_ratio_to_fp32"] < 0.5
    assert_reported_metric(
        home, "scaled", {"x": x[1200:]}, lambda o: accuracy_score(y[1200:], np.argmax(o["probabilities"], 1)), tmp_path
    )


def test_a_model_fitted_on_named_columns_needs_them_in_its_order(home: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = LogisticRegression().fit(x, y)
    model.feature_names_in_ = np.array(["age", "bmi", "bp"], dtype=object)  # what fitting on a DataFrame records
    (tmp_path / "lr.pkl").write_bytes(pickle.dumps(model))
    pq.write_table(pa.table({"bmi": x[:, 1], "age": x[:, 0], "bp": x[:, 2], "y": y}), tmp_path / "eval.parquet")
    code, _, err = cli("register", "named", "--source", tmp_path / "lr.pkl", "--input", "x: float32[-1,3]",
                       "--task", "classification", "--eval", tmp_path / "eval.parquet")  # fmt: skip
    assert code == 2
    assert "the eval file's columns ['bmi', 'age', 'bp'] are not the model's features ['age', 'bmi', 'bp']" in err
