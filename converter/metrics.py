"""The one table of output forms and task metrics: what a metric reads, how, and what it may lose.

A registration's *readout* (:mod:`converter.readout`) says which model output the metric reads and
in which **form**; :data:`FORMS` lists the forms per task. A **metric** (:data:`METRICS`) reads
some forms, needs labels or compares with the source's own outputs, says whether higher is better
and what drop a quantised variant may show by default. A task/metric pair is valid when the metric
reads a form of that task; anything else is refused at registration with the valid choices
(:func:`check_metric`). Everything the gates, the golden cases and the report compute about the
task goes through this module, so a new task (LLM generation) or a new metric is one row in each
table plus its function: no special case elsewhere.

Thresholds are probabilities (0..1) for every form: ``--threshold 0.7`` on a one-logit binary
classifier means "class 1 when sigmoid(logit) >= 0.7".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bundles.errors import ConfigError
from bundles.readout import CLASS_SCORES, SCORE_FORMS, decide_classes
from bundles.readout import logit as _logit


@dataclass(frozen=True)
class Form:
    """How an output is read: its task, what it holds, and whether a threshold applies."""

    task: str
    summary: str
    thresholded: bool = False


FORMS: dict[str, Form] = {
    "logits": Form("classification", "one score per class (argmax); with two classes a threshold reads the "
                   "softmax of the second column", thresholded=True),
    "probabilities": Form("classification", "one probability per class, rows sum to 1 (argmax); with two classes "
                          "a threshold reads the second column", thresholded=True),
    "binary-logit": Form("classification", "one logit per row: class 1 when sigmoid(logit) >= threshold (0.5)",
                         thresholded=True),
    "binary-probability": Form("classification", "one probability per row: class 1 when >= threshold (0.5)",
                               thresholded=True),
    "multilabel-logits": Form("classification", "one logit per label: label on when sigmoid >= threshold (0.5)",
                              thresholded=True),
    "multilabel-probabilities": Form("classification", "one probability per label: on when >= threshold (0.5)",
                                     thresholded=True),
    "labels": Form("classification", "the predicted class itself: an index, or a class value matched by name "
                   "(a scikit-learn classifier's `label` when its scores cannot be read as class scores)"),
    "values": Form("regression", "the predicted values, one or more per row"),
    "embedding": Form("embedding", "one vector per row, compared with the source's vectors"),
}  # fmt: skip
"""Output forms by name (persisted: stable, lowercase)."""

SINGLE_LABEL = ("logits", "probabilities", "binary-logit", "binary-probability", "labels")
MULTILABEL = ("multilabel-logits", "multilabel-probabilities")

Compute = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, "Reading"], float]


@dataclass(frozen=True)
class Reading:
    """What a metric needs to know about the output besides its values: form, threshold, class count."""

    form: str
    threshold: float | None = None
    classes: int = 0
    class_values: tuple[str, ...] = ()
    """How a ``labels`` output names the classes (empty: it holds class indices)."""


@dataclass(frozen=True)
class Metric:
    """One row of the metric table."""

    name: str
    task: str
    forms: tuple[str, ...]
    higher_is_better: bool
    default_max_drop: str
    """Absolute (``0.01``) or relative to the source's value (``2%``)."""
    needs_labels: bool
    compute: Compute
    summary: str
    min_classes: int = 0


def predicted_classes(values: np.ndarray, reading: Reading) -> np.ndarray:
    """Class decisions: class indices per row (single-label) or a 0/1 matrix (multi-label)."""
    if reading.form == "labels":
        return class_indices(values.reshape(-1), reading.class_values)
    if reading.form in SCORE_FORMS:
        return decide_classes(values, reading.form, reading.threshold)
    if reading.form not in MULTILABEL:
        raise ConfigError(f"output form '{reading.form}' has no class decisions")
    scores = values.reshape(len(values), -1).astype(np.float64)
    threshold = 0.5 if reading.threshold is None else reading.threshold
    decided = scores >= _logit(threshold) if reading.form == "multilabel-logits" else scores >= threshold
    return decided.astype(np.int64)


def label_text(value: object) -> str:
    """A class value as text, the way class values are stored (``3`` and ``3.0`` are both "3")."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def class_indices(values: np.ndarray, class_values: tuple[str, ...]) -> np.ndarray:
    """Class values (matched by text; -1 when unknown) or class indices, as indices."""
    if not class_values:
        return values.astype(np.int64)
    position = {name: i for i, name in enumerate(class_values)}
    return np.asarray([position.get(label_text(v), -1) for v in values.tolist()], dtype=np.int64)


def agreement(values: np.ndarray, reference: np.ndarray, reading: Reading) -> float | None:
    """Share of class decisions equal to the source's (top-1 agreement); None for non-class forms."""
    if reading.form not in SINGLE_LABEL + MULTILABEL:
        return None
    return float(np.mean(predicted_classes(values, reading) == predicted_classes(reference, reading)))


def _accuracy(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, reading: Reading) -> float:
    assert targets is not None
    return float(np.mean(predicted_classes(values, reading) == targets.reshape(-1)))


def _top_k(k: int) -> Compute:
    def top_k(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, _reading: Reading) -> float:
        assert targets is not None
        top = np.argsort(-values.reshape(len(values), -1), axis=1, kind="stable")[:, :k]
        return float(np.mean(np.any(top == targets.reshape(-1, 1), axis=1)))

    return top_k


def _f1(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, reading: Reading) -> float:
    """Binary: F1 of class 1. Multi-class: macro F1 over classes. Multi-label: macro F1 over labels."""
    assert targets is not None
    predicted = predicted_classes(values, reading)
    if reading.form in MULTILABEL:
        matrix: np.ndarray = targets.reshape(predicted.shape)
        return float(np.mean([_f1_of(predicted[:, j] == 1, matrix[:, j] == 1) for j in range(matrix.shape[1])]))
    truth: np.ndarray = targets.reshape(-1)
    if reading.classes == 2:
        return _f1_of(predicted == 1, truth == 1)
    classes = np.union1d(np.unique(truth), np.unique(predicted))
    return float(np.mean([_f1_of(predicted == c, truth == c) for c in classes]))


def _f1_of(predicted: np.ndarray, truth: np.ndarray) -> float:
    hits = float(np.sum(predicted & truth))
    denominator = float(np.sum(predicted) + np.sum(truth))
    return 1.0 if denominator == 0 else 2.0 * hits / denominator


def _label_accuracy(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, reading: Reading) -> float:
    assert targets is not None
    predicted = predicted_classes(values, reading)
    return float(np.mean(predicted == targets.reshape(predicted.shape)))


def _errors(values: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    assert targets is not None
    return values.reshape(len(values), -1).astype(np.float64) - targets.reshape(len(targets), -1).astype(np.float64)


def _mae(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, _reading: Reading) -> float:
    return float(np.mean(np.abs(_errors(values, targets))))


def _mse(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, _reading: Reading) -> float:
    return float(np.mean(_errors(values, targets) ** 2))


def _rmse(values: np.ndarray, targets: np.ndarray | None, ref: np.ndarray, reading: Reading) -> float:
    return float(np.sqrt(_mse(values, targets, ref, reading)))


def _r2(values: np.ndarray, targets: np.ndarray | None, _ref: np.ndarray, _reading: Reading) -> float:
    """Coefficient of determination, averaged over output columns (scikit-learn's default)."""
    assert targets is not None
    truth = targets.reshape(len(targets), -1).astype(np.float64)
    residual = np.sum(_errors(values, targets) ** 2, axis=0)
    total = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)
    scores = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.where(residual == 0, 1.0, 0.0))
    return float(np.mean(scores))


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (1 for two zero rows)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    same = np.all(np.isclose(a, b, atol=1e-12), axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(same, 1.0, 0.0))  # type: ignore[no-any-return]


def _cosine(values: np.ndarray, _targets: np.ndarray | None, ref: np.ndarray, _reading: Reading) -> float:
    return float(np.mean(row_cosine(values, ref)))


_NN_CHUNK_ROWS = 256


def nearest_neighbours(vectors: np.ndarray) -> np.ndarray:
    """For each row, the index of its most cosine-similar other row (chunked: memory stays O(rows))."""
    unit = vectors.reshape(len(vectors), -1).astype(np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    found = np.empty(len(unit), dtype=np.int64)
    for start in range(0, len(unit), _NN_CHUNK_ROWS):
        similarity = unit[start : start + _NN_CHUNK_ROWS] @ unit.T
        rows = np.arange(similarity.shape[0])
        similarity[rows, rows + start] = -np.inf
        found[start : start + len(rows)] = np.argmax(similarity, axis=1)
    return found


def _nn_agreement(values: np.ndarray, _targets: np.ndarray | None, ref: np.ndarray, _reading: Reading) -> float:
    if len(values) < 2:
        return 1.0
    return float(np.mean(nearest_neighbours(values) == nearest_neighbours(ref)))


_CLS, _REG, _EMB = "classification", "regression", "embedding"
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", _CLS, SINGLE_LABEL, True, "0.01", True, _accuracy,
               "share of rows whose predicted class is the label"),
        Metric("top3", _CLS, CLASS_SCORES, True, "0.01", True, _top_k(3),
               "share of rows whose label is among the 3 highest scores", min_classes=4),
        Metric("top5", _CLS, CLASS_SCORES, True, "0.01", True, _top_k(5),
               "share of rows whose label is among the 5 highest scores", min_classes=6),
        Metric("f1", _CLS, SINGLE_LABEL + MULTILABEL, True, "0.01", True, _f1,
               "F1 of class 1 (binary), macro F1 over classes or labels"),
        Metric("label_accuracy", _CLS, MULTILABEL, True, "0.01", True, _label_accuracy,
               "share of correct label decisions (1 - Hamming loss)"),
        Metric("mae", _REG, ("values",), False, "2%", True, _mae, "mean absolute error"),
        Metric("rmse", _REG, ("values",), False, "2%", True, _rmse, "root mean squared error"),
        Metric("mse", _REG, ("values",), False, "4%", True, _mse, "mean squared error"),
        Metric("r2", _REG, ("values",), True, "0.01", True, _r2, "coefficient of determination"),
        Metric("cosine", _EMB, ("embedding",), True, "0.01", False, _cosine,
               "mean cosine similarity with the source's vectors"),
        Metric("nn_agreement", _EMB, ("embedding",), True, "0.05", False, _nn_agreement,
               "share of rows whose nearest neighbour (cosine) is the source's"),
    )
}  # fmt: skip
"""The metric table (persisted names: stable, lowercase)."""

DEFAULT_METRIC = {"logits": "accuracy", "probabilities": "accuracy", "binary-logit": "accuracy", "labels": "accuracy",
                  "binary-probability": "accuracy", "multilabel-logits": "label_accuracy",
                  "multilabel-probabilities": "label_accuracy", "values": "mae", "embedding": "cosine"}  # fmt: skip


def tasks_with_metrics() -> tuple[str, ...]:
    return tuple(dict.fromkeys(form.task for form in FORMS.values()))


def metrics_for(task: str) -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.task == task)


def metric(name: str) -> Metric:
    """The metric called ``name`` (ConfigError listing the table when unknown)."""
    if name not in METRICS:
        raise ConfigError(f"metric '{name}' is unknown; {valid_pairs_text()}")
    return METRICS[name]


def valid_pairs_text() -> str:
    return "valid task/metric pairs: " + "; ".join(f"{t}: {', '.join(metrics_for(t))}" for t in tasks_with_metrics())


def check_task(task: str) -> None:
    """ConfigError unless the converter can measure ``task`` (detection, generation: not in this release)."""
    if task not in tasks_with_metrics():
        raise ConfigError(f"task '{task}' has no metric the converter can measure; {valid_pairs_text()}")


def check_metric_task(name: str, task: str) -> Metric:
    """The metric, if it measures ``task``; else a ConfigError naming the task's metrics."""
    check_task(task)
    chosen = metric(name)
    if chosen.task != task:
        raise ConfigError(f"metric '{name}' does not apply to task {task} (valid: {', '.join(metrics_for(task))})")
    return chosen


def check_metric(name: str, task: str, reading: Reading, output: str) -> Metric:
    """The metric, if it reads this task and form with this many classes; else a ConfigError with the choices."""
    chosen = check_metric_task(name, task)
    valid = [m.name for m in METRICS.values() if reading.form in m.forms and reading.classes >= m.min_classes]
    if reading.form not in chosen.forms:
        raise ConfigError(
            f"metric '{name}' does not read output '{output}' ({reading.form}); valid for it: {', '.join(valid)}"
        )
    if reading.classes < chosen.min_classes:
        raise ConfigError(
            f"metric '{name}' needs at least {chosen.min_classes} classes, output '{output}' has "
            f"{reading.classes}; valid for it: {', '.join(valid)}"
        )
    return chosen


def forms_markdown_table() -> str:
    """The form table as Markdown (docs/converter.md holds this text; a test keeps them equal)."""
    lines = ["| form | task | how it is read |", "|---|---|---|"]
    lines += [f"| `{name}` | {form.task} | {form.summary} |" for name, form in FORMS.items()]
    return "\n".join(lines)


def markdown_table() -> str:
    """The metric table as Markdown (docs/converter.md holds this text; a test keeps them equal)."""
    lines = ["| task | metric | reads forms | better | default `--max-drop` | labels | what |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in METRICS.values():
        better = "higher" if m.higher_is_better else "lower"
        labels = "yes" if m.needs_labels else "no (vs source)"
        forms = ", ".join(m.forms) + (f" (>= {m.min_classes} classes)" if m.min_classes else "")
        lines.append(f"| {m.task} | `{m.name}` | {forms} | {better} | {m.default_max_drop} | {labels} | {m.summary} |")
    return "\n".join(lines)
