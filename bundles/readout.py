"""Class decisions from a model's scores, the way the manifest's :class:`~bundles.manifest.Readout` reads them.

The converter scores accuracy with these decisions and builds the drift baseline's output histogram
from them (one count per class); the device counts its answers into that histogram with the same
function, so the two distributions compare like with like. A raw score vector (logits of a CNN, one
logit of a binary MLP) is never a class by itself: counted as values, it would land in no class.

| form | a row of scores | its class |
|---|---|---|
| ``logits``, ``probabilities`` | one score per class | the highest (two columns and a threshold: column 1 vs it) |
| ``binary-logit`` | one logit | 1 when the logit is at least ``logit(threshold)`` (0.5 by default) |
| ``binary-probability`` | one probability | 1 when it is at least the threshold |
"""

from __future__ import annotations

import numpy as np

from bundles.errors import ConfigError

CLASS_SCORES = ("logits", "probabilities")
"""Forms with one score per class."""
SCORE_FORMS = (*CLASS_SCORES, "binary-logit", "binary-probability")
"""Single-label forms whose classes are decided from scores (``labels`` already holds the classes)."""


def decide_classes(scores: np.ndarray, form: str, threshold: float | None = None) -> np.ndarray:
    """The class index of every row of ``scores`` ([rows, ...]) read in ``form`` (a :data:`SCORE_FORMS`)."""
    matrix = scores.reshape(len(scores), -1).astype(np.float64)
    cut = 0.5 if threshold is None else threshold
    if form in CLASS_SCORES:
        if threshold is None or matrix.shape[1] != 2:
            return np.asarray(np.argmax(matrix, axis=1))
        positive = softmax(matrix)[:, 1] if form == "logits" else matrix[:, 1]
        return (positive >= cut).astype(np.int64)
    if form == "binary-logit":
        return (matrix[:, 0] >= logit(cut)).astype(np.int64)
    if form == "binary-probability":
        return (matrix[:, 0] >= cut).astype(np.int64)
    raise ConfigError(f"output form '{form}' has no single-label class decisions")


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a [rows, classes] matrix (numerically stable)."""
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def logit(probability: float) -> float:
    """The logit of a probability strictly between 0 and 1."""
    return float(np.log(probability / (1.0 - probability)))
