"""The digits CNN: a small convolutional classifier trained briefly on scikit-learn's 8x8 digits.

This file is also the ``torch:`` source the demo registers (``make_model`` is the factory), so it
must stay importable on its own: torch and scikit-learn only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class SmallCNN(nn.Module):
    """Conv(1->16) + ReLU, Conv(16->32) + ReLU, MaxPool2, FC 512->64 + ReLU, FC 64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def make_model() -> nn.Module:
    """The factory ``edgefleet-convert register --source torch:digits.py:make_model`` calls."""
    return SmallCNN()


def digits_split(seed: int = 0, scale: float = 1 / 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 75/25 split of the digits, multiplied by ``scale`` (default: to [0, 1]), (n, 1, 8, 8) float32."""
    data = load_digits()
    x = (data.images * scale).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return x_train, x_test, y_train, y_test


def train(x: np.ndarray, y: np.ndarray, budget_s: float = 20.0, max_epochs: int = 40, seed: int = 0) -> nn.Module:
    """Train with Adam for at most ``budget_s`` seconds or ``max_epochs`` epochs (deterministic order)."""
    torch.manual_seed(seed)
    model = make_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for _ in range(max_epochs):
        for idx in torch.split(torch.randperm(len(xs), generator=generator), 64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        if time.monotonic() - started > budget_s:
            break
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``x`` against labels ``y``."""
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


@dataclass(frozen=True)
class TrainingOutputs:
    """What ``edgefleet-convert register`` needs, written by :func:`write_training_outputs`."""

    weights: Path
    eval: Path
    calibration: Path
    labels: Path
    test_accuracy: float


def write_training_outputs(out_dir: Path, budget_s: float = 20.0, scale: float = 1 / 16) -> TrainingOutputs:
    """Train, then write the weights, the eval/calibration data and the labels into ``out_dir``.

    ``scale`` multiplies the raw 0..16 pixel values; the demo's faulty retraining passes 1.0 (it
    forgot to normalise), which no offline check can see: the model is consistent with its own data.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = digits_split(scale=scale)
    model = train(x_train, y_train, budget_s=budget_s)
    outputs = TrainingOutputs(
        weights=out_dir / "cnn.pt",
        eval=out_dir / "eval.npz",
        calibration=out_dir / "calib.npz",
        labels=out_dir / "labels.txt",
        test_accuracy=accuracy(model, x_test, y_test),
    )
    torch.save(model.state_dict(), outputs.weights)
    np.savez(outputs.eval, x=x_test, y=y_test)
    np.savez(outputs.calibration, x=x_train[:300])
    outputs.labels.write_text("\n".join(str(d) for d in range(10)) + "\n")
    return outputs
