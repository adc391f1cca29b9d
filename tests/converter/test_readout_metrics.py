"""Metrics that know the model's output: each model that exposed a meaningless number, scored right now.

Every kept variant's metric is recomputed from the bundle's files with onnxruntime and scikit-learn
(``tests/converter/recompute.py``) and must equal the reported one.
"""

from __future__ import annotations

import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score, root_mean_squared_error

from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import ok
from tests.converter.recompute import assert_reported_metric, latest

BINARY_MLP = textwrap.dedent(
    """
    import torch


    class TabularMLP(torch.nn.Module):
        \"\"\"A tabular binary classifier with one logit (LayerNorm and GELU), or its sigmoid.\"\"\"

        def __init__(self, features=30, outputs=1, probability=False):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(features, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, outputs)
            )
            self.probability = probability

        def forward(self, x):
            scores = self.body(x)
            return torch.sigmoid(scores) if self.probability else scores


    def make_model():
        return TabularMLP()


    def make_probability():
        return TabularMLP(probability=True)


    def make_multilabel():
        return TabularMLP(64, 3)
    """
)


@dataclass(frozen=True)
class Trained:
    factory: Path
    weights: Path
    eval: Path
    calibration: Path
    x: np.ndarray
    y: np.ndarray
    source_accuracy: float


def _train(directory: Path, factory: str, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[Path, Path]:
    """Full-batch Adam on binary cross-entropy (one thread, a second or two)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(BINARY_MLP)
    namespace: dict[str, object] = {}
    exec(BINARY_MLP, namespace)  # noqa: S102 - the test's own model code
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model = namespace[factory]()  # type: ignore[operator]
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.reshape(len(y), -1).astype(np.float32))
        for _ in range(epochs):
            optimiser.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(xt), yt).backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), directory / "weights.pt")
    return directory / "model.py", directory / "weights.pt"


def _logits(factory: Path, weights: Path, name: str, x: np.ndarray) -> np.ndarray:
    import torch

    namespace: dict[str, object] = {}
    exec(factory.read_text(), namespace)  # noqa: S102
    model = namespace[name]()  # type: ignore[operator]
    model.load_state_dict(torch.load(weights))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def binary_mlp(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from sklearn.datasets import load_breast_cancer

    directory = tmp_path_factory.mktemp("binary")
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:455], order[455:]
    x = ((x - x[train].mean(0)) / x[train].std(0)).astype(np.float32)
    factory, weights = _train(directory, "make_model", x[train], y[train], epochs=60)
    np.savez(directory / "eval.npz", x=x[test], y=y[test])
    np.savez(directory / "calib.npz", x=x[train][:200] * 50.0)  # calibrated on data scaled by mistake
    accuracy = float(np.mean((_logits(factory, weights, "make_model", x[test])[:, 0] >= 0) == y[test]))
    return Trained(factory, weights, directory / "eval.npz", directory / "calib.npz", x[test], y[test], accuracy)


def test_a_one_logit_binary_classifier_is_scored_by_its_decision_and_the_accuracy_gate_refuses(
    home: Path, binary_mlp: Trained, tmp_path: Path
) -> None:
    out = ok("register", "cancer", "--source", f"torch:{binary_mlp.factory}:make_model", "--weights",
             binary_mlp.weights, "--input", "x: float32[-1,30]", "--task", "classification", "--eval", binary_mlp.eval,
             "--calibration", binary_mlp.calibration, "--prefer", "size")  # fmt: skip
    assert "metric accuracy reads output 'logits' as binary-logit (2 classes)" in out
    ok("convert", "cancer", "--targets", "onnx", "--quantize", "fp32,int8-static,int8-dynamic")
    results, _ = latest(home, "cancer")
    fp32 = results["onnx-fp32"]["metrics"]
    # argmax over one column scored every row as class 0: accuracy = share of class 0 (0.41 here)
    assert fp32["metric_value"] == pytest.approx(binary_mlp.source_accuracy) and fp32["metric_value"] > 0.9
    assert float(np.mean(binary_mlp.y == 0)) < 0.5
    static = results["onnx-int8-static"]
    assert static["status"] == "refused" and static["reasons"][0].startswith("accuracy ")
    assert static["metrics"]["metric_drop"] > 0.01
    manifest = assert_reported_metric(
        home, "cancer", {"x": binary_mlp.x},
        lambda outputs: accuracy_score(binary_mlp.y, outputs["logits"][:, 0] >= 0.0), tmp_path,
    )  # fmt: skip
    assert manifest.readout is not None and manifest.readout.form == "binary-logit"
    assert manifest.readout.classes == ("0", "1")


def test_a_one_probability_binary_classifier_is_scored_by_its_decision(
    home: Path, binary_mlp: Trained, tmp_path: Path
) -> None:
    out = ok("register", "cancer-p", "--source", f"torch:{binary_mlp.factory}:make_probability", "--weights",
             binary_mlp.weights, "--input", "x: float32[-1,30]", "--task", "classification", "--eval", binary_mlp.eval,
             "--prefer", "size")  # fmt: skip
    assert "metric accuracy reads output 'logits' as binary-probability (2 classes)" in out
    ok("convert", "cancer-p", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "cancer-p")
    assert results["onnx-fp32"]["metrics"]["metric_value"] == pytest.approx(binary_mlp.source_accuracy)
    assert_reported_metric(home, "cancer-p", {"x": binary_mlp.x},
                           lambda o: accuracy_score(binary_mlp.y, o["logits"][:, 0] >= 0.5), tmp_path)  # fmt: skip


def test_a_threshold_is_a_probability_applied_through_the_sigmoid(
    home: Path, binary_mlp: Trained, tmp_path: Path
) -> None:
    ok("register", "strict", "--source", f"torch:{binary_mlp.factory}:make_model", "--weights", binary_mlp.weights,
       "--input", "x: float32[-1,30]", "--task", "classification", "--eval", binary_mlp.eval,
       "--output", "logits:binary-logit", "--threshold", "0.95", "--metric", "f1")  # fmt: skip
    ok("convert", "strict", "--targets", "onnx", "--quantize", "fp32")

    def f1_at_095(outputs: dict[str, np.ndarray]) -> float:
        probability = 1.0 / (1.0 + np.exp(-outputs["logits"][:, 0].astype(np.float64)))
        return float(f1_score(binary_mlp.y, probability >= 0.95))

    manifest = assert_reported_metric(home, "strict", {"x": binary_mlp.x}, f1_at_095, tmp_path)
    assert manifest.readout is not None and manifest.readout.threshold == 0.95


def test_two_column_probabilities_of_a_scikit_learn_classifier_take_a_threshold(home: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x[::2], y[::2])
    (tmp_path / "lr.pkl").write_bytes(pickle.dumps(model))
    np.savez(tmp_path / "eval.npz", x=x[1::2], y=y[1::2])
    out = ok("register", "lr", "--source", tmp_path / "lr.pkl", "--input", "x: float32[-1,30]", "--task",
             "classification", "--eval", tmp_path / "eval.npz", "--threshold", "0.8", "--metric", "f1")  # fmt: skip
    assert "reads output 'probabilities' as probabilities (2 classes, threshold 0.8)" in out
    ok("convert", "lr", "--targets", "onnx", "--quantize", "fp32")
    assert_reported_metric(
        home, "lr", {"x": x[1::2]}, lambda o: float(f1_score(y[1::2], o["probabilities"][:, 1] >= 0.8)), tmp_path
    )


def test_a_multi_label_classifier_is_scored_per_label(home: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    d = digits.target
    y = np.stack([d % 2 == 0, d > 4, np.isin(d, (2, 3, 5, 7))], axis=1).astype(np.int64)  # even, big, prime
    factory, weights = _train(tmp_path / "ml", "make_multilabel", x[:1200], y[:1200], epochs=80)
    np.savez(tmp_path / "eval.npz", x=x[1200:], y=y[1200:])
    out = ok("register", "traits", "--source", f"torch:{factory}:make_multilabel", "--weights", weights,
             "--input", "x: float32[-1,64]", "--task", "classification", "--eval", tmp_path / "eval.npz",
             "--prefer", "size")  # fmt: skip
    assert "metric label_accuracy reads output 'logits' as multilabel-logits (3 labels)" in out
    ok("convert", "traits", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "traits")
    assert results["onnx-fp32"]["metrics"]["metric_value"] > 0.85
    assert_reported_metric(
        home, "traits", {"x": x[1200:]}, lambda o: float(np.mean((o["logits"] >= 0) == y[1200:])), tmp_path
    )


@dataclass(frozen=True)
class Regressor:
    model: Path
    eval: Path
    x: np.ndarray
    y: np.ndarray


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> Regressor:
    """An MLP regressor on the diabetes data, the target in its own units (MAE about 45)."""
    from sklearn.datasets import load_diabetes
    from sklearn.neural_network import MLPRegressor

    directory = tmp_path_factory.mktemp("diabetes")
    x, y = load_diabetes(return_X_y=True)
    x, y = (x * 10).astype(np.float32), y.astype(np.float32)
    model = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=200, learning_rate_init=0.01, random_state=0)
    (directory / "mlp.pkl").write_bytes(pickle.dumps(model.fit(x[:350], y[:350])))
    np.savez(directory / "eval.npz", x=x[350:], y=y[350:])
    return Regressor(directory / "mlp.pkl", directory / "eval.npz", x[350:], y[350:].astype(np.float64))


def test_an_mae_regressor_is_judged_by_a_relative_default_budget(home: Path, diabetes: Regressor,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    out = ok("register", "diabetes", "--source", diabetes.model, "--input", "x: float32[-1,10]", "--task",
             "regression", "--eval", diabetes.eval, "--prefer", "size")  # fmt: skip
    assert "metric mae reads output 'variable' as values" in out
    ok("convert", "diabetes", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "diabetes")
    dynamic = results["onnx-int8-dynamic"]
    source = dynamic["metrics"]["source_metric_value"]
    assert 20 < source < 80
    # quantisation costs a little MAE: more than the old absolute 0.01, well within 2 % of the source's MAE
    assert 0.01 < dynamic["metrics"]["metric_drop"] < 0.02 * source
    assert dynamic["status"] == "passed", dynamic["reasons"]
    assert dynamic["metrics"]["gates"]["max_drop"] == 0.02 and dynamic["metrics"]["gates"]["max_drop_relative"]
    assert_reported_metric(
        home, "diabetes", {"x": diabetes.x},
        lambda o: float(mean_absolute_error(diabetes.y, o["variable"][:, 0].astype(np.float64))), tmp_path,
    )  # fmt: skip
    report = (Home(home).reports_dir("diabetes", 1) / "conversion-1" / "report.md").read_text()
    assert "mae (lower is better)" in report and "max_drop=2% (mae default)" in report


@pytest.mark.parametrize(("metric", "budget", "title"), [("rmse", (0.02, True), "rmse (lower is better)"),
                                                         ("r2", (0.01, False), "| r2 |")])  # fmt: skip
def test_rmse_and_r2_read_the_values_with_their_own_default_budgets(
    home: Path, diabetes: Regressor, tmp_path: Path, metric: str, budget: tuple[float, bool], title: str
) -> None:
    ok("register", "diabetes", "--source", diabetes.model, "--input", "x: float32[-1,10]", "--task", "regression",
       "--metric", metric, "--eval", diabetes.eval, "--prefer", "size")  # fmt: skip
    ok("convert", "diabetes", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "diabetes")
    gates = results["onnx-fp32"]["metrics"]["gates"]
    assert (gates["max_drop"], gates["max_drop_relative"]) == budget
    score = {"rmse": root_mean_squared_error, "r2": r2_score}[metric]
    assert_reported_metric(home, "diabetes", {"x": diabetes.x},
                           lambda o: float(score(diabetes.y, o["variable"][:, 0].astype(np.float64))),
                           tmp_path)  # fmt: skip
    assert title in (Home(home).reports_dir("diabetes", 1) / "conversion-1" / "report.md").read_text()


def _encoder(path: Path) -> Path:
    """A small sentence encoder as ONNX: token embeddings, mean pooling, projection, L2 Normalizer (ai.onnx.ml)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(500, 48)).astype(np.float32), "token_embeddings"),
        numpy_helper.from_array(rng.normal(size=(48, 24)).astype(np.float32) / 7.0, "projection"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sequence_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["token_embeddings", "input_ids"], ["tokens"]),
        helper.make_node("ReduceMean", ["tokens", "sequence_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "projection"], ["projected"]),
        helper.make_node("Normalizer", ["projected"], ["sentence_embedding"], domain="ai.onnx.ml", norm="L2"),
    ]
    graph = helper.make_graph(
        nodes, "encoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 12])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", 24])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _nearest(vectors: np.ndarray) -> np.ndarray:
    from sklearn.metrics.pairwise import cosine_similarity

    similarity = cosine_similarity(vectors.astype(np.float64))
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)  # type: ignore[no-any-return]


def test_an_onnx_sentence_encoder_is_gated_on_nearest_neighbours_and_leaves_nothing_outside_the_home(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import onnxruntime as ort

    model = _encoder(tmp_path / "encoder.onnx")
    ids = np.random.default_rng(4).integers(0, 500, size=(160, 12)).astype(np.int64)
    np.savez(tmp_path / "eval.npz", input_ids=ids)  # no labels: embeddings are compared with the source's
    # ONNX Runtime's shape inference gives up on the Normalizer and writes its temp model and a <uuid>.data
    # file into the current directory; the quantiser's own temp dirs go to the temp directory
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out = ok("register", "encoder", "--source", model, "--input", "input_ids: int64[-1,12]", "--task", "embedding",
             "--metric", "nn_agreement", "--eval", tmp_path / "eval.npz", "--prefer", "size")  # fmt: skip
    assert "metric nn_agreement reads output 'sentence_embedding' as embedding" in out
    ok("convert", "encoder", "--targets", "onnx,ort", "--quantize", "fp32,int8-dynamic")
    assert list(cwd.iterdir()) == [] and list(temp.iterdir()) == []
    assert not (home / "tmp").exists()
    results, _ = latest(home, "encoder")
    assert results["onnx-int8-dynamic"]["status"] == "passed", results["onnx-int8-dynamic"]["reasons"]
    source = ort.InferenceSession(str(model)).run(None, {"input_ids": ids})[0]
    assert_reported_metric(
        home, "encoder", {"input_ids": ids},
        lambda o: float(np.mean(_nearest(o["sentence_embedding"]) == _nearest(source))), tmp_path,
    )  # fmt: skip
    assert Registry(Home(home)).get("encoder").spec.budgets.drop_budget("nn_agreement") == (0.05, False)


def test_an_embedding_is_gated_by_default_on_its_cosine_with_the_source_vectors(home: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _encoder(tmp_path / "encoder.onnx")
    ids = np.random.default_rng(5).integers(0, 500, size=(96, 12)).astype(np.int64)
    np.savez(tmp_path / "eval.npz", input_ids=ids)
    out = ok("register", "encoder", "--source", model, "--input", "input_ids: int64[-1,12]", "--task", "embedding",
             "--eval", tmp_path / "eval.npz", "--prefer", "size")  # fmt: skip
    assert "metric cosine reads output 'sentence_embedding' as embedding" in out
    ok("convert", "encoder", "--targets", "onnx", "--quantize", "fp32,int8-dynamic")
    results, _ = latest(home, "encoder")
    assert results["onnx-int8-dynamic"]["metrics"]["gates"]["max_drop"] == 0.01
    source = ort.InferenceSession(str(model)).run(None, {"input_ids": ids})[0].astype(np.float64)

    def mean_cosine(outputs: dict[str, np.ndarray]) -> float:
        vectors = outputs["sentence_embedding"].astype(np.float64)
        dots = np.sum(vectors * source, axis=1)
        return float(np.mean(dots / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(source, axis=1))))

    assert_reported_metric(home, "encoder", {"input_ids": ids}, mean_cosine, tmp_path)
