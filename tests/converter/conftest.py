"""Real models for the converter tests, trained once per session on scikit-learn's digits.

- ``digits_cnn``: a small CNN (torch factory file + state dict), dynamic batch 1..32, eval and
  calibration .npz files;
- ``digits_forest``: a random forest through skl2onnx (pickle);
- ``diabetes_mlp``: an MLP regressor (scikit-learn, pickle) on the diabetes data set;
- ``onnx_file``: the CNN's fp32 export as a plain ONNX file source.
"""

from __future__ import annotations

import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CNN_FACTORY = textwrap.dedent(
    """
    import torch


    class SmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
            self.f1 = torch.nn.Linear(512, 64)
            self.f2 = torch.nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
            return self.f2(torch.relu(self.f1(x.flatten(1))))


    def make_model():
        return SmallCNN()
    """
)


@dataclass(frozen=True)
class DigitsCnn:
    factory: Path
    weights: Path
    eval: Path
    calibration: Path
    eval_x: np.ndarray
    eval_y: np.ndarray


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1347], order[1347:]
    return images[train], labels[train], images[test], labels[test]


def train_digits_cnn(directory: Path, epochs: int = 8) -> DigitsCnn:
    """Train the CNN briefly (a few seconds, one thread: the host is shared) and write factory, weights, data."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(directory, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(directory: Path, epochs: int) -> DigitsCnn:
    import torch

    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(CNN_FACTORY, namespace)  # noqa: S102 - the test's own model code
    model = namespace["make_model"]()  # type: ignore[operator]
    x_train, y_train, x_test, y_test = _digits_split()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        for start in range(0, len(xt), 64):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[start : start + 64]), yt[start : start + 64])
            loss.backward()
            optimiser.step()
    directory.mkdir(parents=True, exist_ok=True)
    factory = directory / "train.py"
    factory.write_text(CNN_FACTORY)
    weights = directory / "cnn.pt"
    torch.save(model.state_dict(), weights)
    np.savez(directory / "eval.npz", x=x_test, y=y_test)
    np.savez(directory / "calib.npz", x=x_train[:300])
    return DigitsCnn(factory, weights, directory / "eval.npz", directory / "calib.npz", x_test, y_test)


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> DigitsCnn:
    return train_digits_cnn(tmp_path_factory.mktemp("digits_cnn"))


@dataclass(frozen=True)
class TabularModel:
    model: Path
    eval: Path


@pytest.fixture(scope="session")
def digits_forest(tmp_path_factory: pytest.TempPathFactory) -> TabularModel:
    from sklearn.ensemble import RandomForestClassifier

    directory = tmp_path_factory.mktemp("forest")
    x_train, y_train, x_test, y_test = _digits_split()
    forest = RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0)
    forest.fit(x_train.reshape(len(x_train), -1), y_train)
    (directory / "forest.pkl").write_bytes(pickle.dumps(forest))
    np.savez(directory / "eval.npz", x=x_test.reshape(len(x_test), -1), y=y_test)
    return TabularModel(directory / "forest.pkl", directory / "eval.npz")


@pytest.fixture(scope="session")
def diabetes_mlp(tmp_path_factory: pytest.TempPathFactory) -> TabularModel:
    from sklearn.datasets import load_diabetes
    from sklearn.neural_network import MLPRegressor

    directory = tmp_path_factory.mktemp("mlp")
    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    y = (y / 100.0).astype(np.float32)
    regressor = MLPRegressor(hidden_layer_sizes=(32,), max_iter=400, random_state=0).fit(x[:350], y[:350])
    (directory / "mlp.pkl").write_bytes(pickle.dumps(regressor))
    np.savez(directory / "eval.npz", x=x[350:], y=y[350:])
    np.savez(directory / "calib.npz", x=x[:200])
    return TabularModel(directory / "mlp.pkl", directory / "eval.npz")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $EDGEFLEET_HOME per test."""
    root = tmp_path / "edgefleet-home"
    monkeypatch.setenv("EDGEFLEET_HOME", str(root))
    return root
