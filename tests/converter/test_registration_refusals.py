"""What registration refuses, each with the model that exposed it: one line, exit 2, nothing left behind.

Task/metric pairs that make no sense switched the gate off (accuracy 0 for every variant of a
regressor, "drop 0"); a labels file with the wrong class count was dropped silently; labels shaped
like an embedding failed later with a numpy broadcast error; a float64 spec for a float32 model
registered and failed at conversion; a torch factory without weights registered random weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from bundles.manifest import Manifest
from converter.home import Home
from converter.registry import Registry
from tests.converter.helpers import cli, ok


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A binary classifier and a regressor (scikit-learn), with eval files, written once."""
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    directory = tmp_path_factory.mktemp("refusals")
    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x, y)
    (directory / "classifier.pkl").write_bytes(pickle.dumps(classifier))
    np.savez(directory / "classifier.npz", x=x[:80], y=y[:80])
    xr, yr = load_diabetes(return_X_y=True)
    xr, yr = xr.astype(np.float32), yr.astype(np.float32)
    regressor = MLPRegressor(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(xr, yr)
    (directory / "regressor.pkl").write_bytes(pickle.dumps(regressor))
    np.savez(directory / "regressor.npz", x=xr[:80], y=yr[:80])
    np.savez(directory / "embedding_labels.npz", x=xr[:80], y=np.ones((80, 8), dtype=np.float32))
    (directory / "three.txt").write_text("benign\nmalignant\nunsure\n")
    return {p.name: p for p in directory.iterdir()}


CASES = {
    "accuracy on a regression": (
        ["regressor", "x: float32[-1,10]", "--task", "regression", "--metric", "accuracy"],
        "metric 'accuracy' does not apply to task regression (valid: mae, rmse, mse, r2)",
    ),
    "mae on a classifier": (
        ["classifier", "x: float32[-1,30]", "--task", "classification", "--metric", "mae"],
        "metric 'mae' does not apply to task classification (valid: accuracy, top3, top5, f1, label_accuracy)",
    ),
    "top-5 with two classes": (
        ["classifier", "x: float32[-1,30]", "--task", "classification", "--metric", "top5"],
        "metric 'top5' needs at least 6 classes, output 'probabilities' has 2; valid for it: accuracy, f1",
    ),
    "cosine on a classifier": (
        ["classifier", "x: float32[-1,30]", "--task", "classification", "--metric", "cosine"],
        "metric 'cosine' does not apply to task classification",
    ),
    "detection on a classifier": (
        ["classifier", "x: float32[-1,30]", "--task", "detection"],
        "task 'detection' has no metric the converter can measure; valid task/metric pairs: classification: "
        "accuracy, top3, top5, f1, label_accuracy; regression: mae, rmse, mse, r2; embedding: cosine, nn_agreement",
    ),
    "regression on a classifier": (
        ["classifier", "x: float32[-1,30]", "--task", "regression"],
        "eval file classifier.npz: labels have 1 value(s) per row, but output 'probabilities' gives 2",
    ),
    "labels shaped like an embedding": (
        ["regressor", "x: float32[-1,10]", "--task", "regression", "--eval-file", "embedding_labels"],
        "eval file embedding_labels.npz: labels have 8 value(s) per row, but output 'variable' gives 1",
    ),
    "a labels file with the wrong class count": (
        ["classifier", "x: float32[-1,30]", "--task", "classification", "--labels-file", "three"],
        "the labels file names 3 classes, but output 'probabilities' (probabilities) has 2 classes",
    ),
    "a float64 spec for a float32 model": (
        ["classifier", "x: float64[-1,30]", "--task", "classification"],
        "the scikit-learn model: input 'x' is float32 in the model, the spec declares float64",
    ),
    "a threshold on a regression": (
        ["regressor", "x: float32[-1,10]", "--task", "regression", "--threshold", "0.7"],
        "--threshold applies to binary and multi-label outputs; this output is read as values with 1 columns",
    ),
}


def _args(models: dict[str, Path], case: list[str]) -> list[str | Path]:
    model, spec, *rest = case
    eval_name = f"{model}.npz"
    extra: list[str | Path] = []
    while rest:
        option, value, *rest = rest
        if option == "--eval-file":
            eval_name = f"{value}.npz"
        elif option == "--labels-file":
            extra += ["--labels", models[f"{value}.txt"]]
        else:
            extra += [option, value]
    return ["register", "refused", "--source", f"sklearn:{models[model + '.pkl']}", "--input", spec,
            "--eval", models[eval_name], *extra]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_registration_refuses_with_the_valid_choices_and_leaves_nothing(
    home: Path, models: dict[str, Path], case: str
) -> None:
    arguments, expected = CASES[case]
    code, out, err = cli(*_args(models, arguments))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err, out)
    assert lines[0].startswith("error: model refused (new version), variant source: "), lines[0]
    assert expected in lines[0], lines[0]
    assert Registry(Home(home)).versions() == []
    assert not (home / "artifacts").exists()  # no empty folders after a failed registration


def test_a_torch_factory_needs_weights_unless_random_init_is_asked_for(home: Path, tmp_path: Path) -> None:
    factory = tmp_path / "mlp.py"
    factory.write_text(
        "import torch\n\n\ndef make_model():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))\n"
    )
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32),
             y=np.zeros(20, dtype=np.int64))  # fmt: skip
    base = ["register", "mlp", "--source", f"torch:{factory}:make_model", "--input", "x: float32[-1,4]", "--task",
            "classification", "--eval", tmp_path / "eval.npz"]  # fmt: skip
    code, _, err = cli(*base)
    assert code == 2
    assert "the torch factory make_model() needs --weights (its trained state dict); give --random-init" in err
    assert not (home / "artifacts").exists()
    ok(*base, "--random-init")
    ok(*base, "--random-init")
    registry = Registry(Home(home))
    assert [m.spec.random_init for m in registry.versions("mlp")] == [True, True]
    ok("convert", "mlp@1", "--targets", "onnx", "--quantize", "fp32")
    ok("convert", "mlp@2", "--targets", "onnx", "--quantize", "fp32")
    first, second = (
        Manifest.from_bytes((Home(home).conversion_dir("mlp", v, 1) / "bundle" / "manifest.json").read_bytes())
        for v in (1, 2)
    )
    assert first.golden.cases == second.golden.cases  # the factory's initial weights are seeded: the same model


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("x: float64[-1,30]", "the source model cannot run on the declared inputs (check --input): RuntimeError: "
         "mat1 and mat2 must have the same dtype"),
        # a torch module takes any shape until it is exported: this one registered, and its conversion failed
        ("x: float32[-1,-1]", "input 'x' declares dimension 1 dynamic (1..32), but the source model fails at size 1: "
         "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ],
)  # fmt: skip
def test_a_torch_spec_the_module_cannot_take_is_refused_at_registration(
    home: Path, tmp_path: Path, spec: str, expected: str
) -> None:
    factory = tmp_path / "tabular.py"
    factory.write_text(
        "import torch\n\n\ndef make_model():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
    )
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32),
             y=np.zeros(40, dtype=np.int64))  # fmt: skip
    code, out, err = cli("register", "refused", "--source", f"torch:{factory}:make_model", "--random-init",
                         "--input", spec, "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err, out)
    assert lines[0].startswith("error: model refused (new version), variant source: " + expected), lines[0]
    assert Registry(Home(home)).versions() == []
    assert not (home / "artifacts").exists()


def test_string_eval_labels_without_class_names_are_refused(home: Path, tmp_path: Path) -> None:
    factory = tmp_path / "mlp.py"
    factory.write_text("import torch\n\ndef make_model():\n    return torch.nn.Linear(4, 2)\n")
    names = np.array(["cat", "dog"] * 10)
    np.savez(tmp_path / "eval.npz", x=np.zeros((20, 4), dtype=np.float32), y=names)
    code, _, err = cli("register", "pets", "--source", f"torch:{factory}:make_model", "--random-init", "--input",
                       "x: float32[-1,4]", "--task", "classification", "--eval", tmp_path / "eval.npz")  # fmt: skip
    assert code == 2 and "the eval labels are names ('cat', ...): give --labels" in err
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    out = ok("register", "pets", "--source", f"torch:{factory}:make_model", "--random-init", "--input",
             "x: float32[-1,4]", "--task", "classification", "--eval", tmp_path / "eval.npz", "--labels",
             tmp_path / "labels.txt")  # fmt: skip
    assert "as logits (2 classes)" in out
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 4), dtype=np.float32), y=np.array(["cat", "cow"] * 10))
    code, _, err = cli("register", "pets", "--source", f"torch:{factory}:make_model", "--random-init", "--input",
                       "x: float32[-1,4]", "--task", "classification", "--eval", tmp_path / "bad.npz", "--labels",
                       tmp_path / "labels.txt")  # fmt: skip
    assert code == 2 and "eval file bad.npz: label 'cow' is not one of the model's classes (cat, dog)" in err
