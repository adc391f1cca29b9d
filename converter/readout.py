"""The readout: which model output the task metric reads, in which form, and what its classes are.

Registration infers it from the source model's outputs on evaluation rows and from the labels
(:func:`infer_readout`), unless the user names it (``--output NAME[:FORM]``, ``--threshold``):

- classification: the first floating-point output (or the one whose width matches 2-D labels).
  Labels with several 0/1 columns make it multi-label; a single column is a binary classifier
  (one logit, or one probability when every value lies in [0, 1]); several columns are class
  scores, read as probabilities when they lie in [0, 1] and each row sums to 1, else as logits;
- regression: the values (the labels must have as many columns as the output);
- embedding: the vectors (no labels needed: compared with the source's vectors).

Class names come from ``--labels`` (checked against the output's class count), else from the
model (scikit-learn's ``classes_``, which may be strings), else ``"0".."k-1"``. Evaluation labels
are class indices, or class names matched by text (``label_values``: the model's own class values
for scikit-learn, the ``--labels`` names for string labels). :func:`encode_targets` turns the
labels of the evaluation file into what the metric compares with, refusing labels that cannot
mean anything for this output with one sentence naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.errors import ConfigError
from converter.metrics import FORMS, MULTILABEL, SINGLE_LABEL, Reading, check_task, label_text, predicted_classes

_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Readout:
    """How the metric reads the model (persisted in the registry spec; the manifest gets a copy)."""

    output: str
    form: str
    threshold: float | None = None
    classes: tuple[str, ...] = ()
    label_values: tuple[str, ...] = ()

    @property
    def reading(self) -> Reading:
        return Reading(form=self.form, threshold=self.threshold, classes=len(self.classes),
                       class_values=self.label_values)  # fmt: skip

    def describe(self) -> str:
        """``output 'logits' as logits (10 classes)``: what register prints."""
        detail = f"{len(self.classes)} classes" if self.classes else ""
        if self.form in MULTILABEL:
            detail = f"{len(self.classes)} labels"
        if self.threshold is not None:
            detail += f", threshold {self.threshold:g}"
        return f"output '{self.output}' as {self.form}" + (f" ({detail.lstrip(', ')})" if detail else "")

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "form": self.form, "threshold": self.threshold,
                "classes": list(self.classes), "label_values": list(self.label_values)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Readout:
        return cls(output=data["output"], form=data["form"], threshold=data.get("threshold"),
                   classes=tuple(data.get("classes", ())),
                   label_values=tuple(data.get("label_values", ())))  # fmt: skip


@dataclass(frozen=True)
class Request:
    """What the user asked for (``--output NAME[:FORM]``, ``--threshold``), None where inferred."""

    output: str | None = None
    form: str | None = None
    threshold: float | None = None

    @classmethod
    def parse(cls, output: str | None, threshold: float | None) -> Request:
        name, form = (None, None)
        if output:
            head, sep, tail = output.partition(":")
            name, form = head.strip() or None, tail.strip() if sep else None
            if form is not None and form not in FORMS:
                raise ConfigError(f"--output '{output}': form '{form}' is not one of {', '.join(FORMS)}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ConfigError(f"--threshold {threshold} is not a probability strictly between 0 and 1")
        return cls(output=name, form=form, threshold=threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "form": self.form, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        return cls(output=data.get("output"), form=data.get("form"), threshold=data.get("threshold"))


def infer_readout(task: str, outputs: dict[str, np.ndarray], labels: np.ndarray | None, request: Request,
                  names: tuple[str, ...], model_classes: tuple[str, ...]) -> Readout:  # fmt: skip
    """The readout for ``task`` from the source's ``outputs`` on evaluation rows; see the module docstring."""
    check_task(task)
    name = _choose_output(task, outputs, labels, request.output)
    values = outputs[name].reshape(len(outputs[name]), -1)
    form = request.form or ("labels" if values.dtype.kind not in "f" else _infer_form(task, values, labels))
    if FORMS[form].task != task:
        tasks_forms = ", ".join(f for f, spec in FORMS.items() if spec.task == task)
        raise ConfigError(f"--output form '{form}' is not a form of task {task} (valid: {tasks_forms})")
    _check_threshold(request.threshold, form, values.shape[1])
    classes = _classes(form, values.shape[1], name, names, model_classes)
    named = labels is not None and labels.dtype.kind in "USO" and form in SINGLE_LABEL
    if labels is not None and named and not (names or model_classes):
        raise ConfigError(
            f"the eval labels are names ({label_text(labels.reshape(-1)[0])!r}, ...): give --labels with the "
            f"class names in the order of output '{name}'"
        )
    label_values = model_classes or (classes if named else ())
    readout = Readout(output=name, form=form, threshold=request.threshold, classes=classes, label_values=label_values)
    return readout if request.output else _agreeing_with_own_labels(readout, outputs)


def _agreeing_with_own_labels(readout: Readout, outputs: dict[str, np.ndarray]) -> Readout:
    """The inferred readout, or the model's own label output when the scores' decisions contradict it.

    A scikit-learn classifier without ``predict_proba`` exports its decision function in a layout
    skl2onnx picks (``[d, -d]`` for a binary SVC: its argmax is the wrong class); ``SVC(probability=True)``
    predicts by votes, not by its probabilities. What the model itself predicts is ``label``.
    """
    own = _label_output(outputs) if readout.label_values and readout.form in SINGLE_LABEL else None
    if own is None or readout.form == "labels":
        return readout
    as_scores = dataclasses.replace(readout.reading, threshold=None)  # the layout, not the user's threshold
    decided = predicted_classes(outputs[readout.output], as_scores)
    predicted = predicted_classes(outputs[own], Reading("labels", class_values=readout.label_values))
    if np.array_equal(decided, predicted):
        return readout
    return Readout(output=own, form="labels", classes=readout.classes, label_values=readout.label_values)


def _label_output(outputs: dict[str, np.ndarray]) -> str | None:
    """The model's own predicted class values: a 1-D integer or string output."""
    return next((n for n, v in outputs.items() if v.ndim == 1 and v.dtype.kind in "biuUSO"), None)


def _choose_output(task: str, outputs: dict[str, np.ndarray], labels: np.ndarray | None, wanted: str | None) -> str:
    floats = [n for n, v in outputs.items() if v.dtype.kind == "f" and v.ndim >= 1]
    if wanted is not None:
        if wanted not in outputs:
            raise ConfigError(f"--output '{wanted}' is not an output of the model (outputs: {', '.join(outputs)})")
        if wanted not in floats and not (task == "classification" and wanted == _label_output(outputs)):
            raise ConfigError(
                f"output '{wanted}' holds {outputs[wanted].dtype} values; the metric reads scores, values or "
                f"one class per row (floating-point outputs: {', '.join(floats) or 'none'})"
            )
        return wanted
    if not floats:
        raise ConfigError(f"the model has no floating-point output to measure (outputs: {', '.join(outputs)})")
    if task == "classification" and labels is not None and labels.ndim == 2 and labels.shape[1] > 1:
        matching = [n for n in floats if _width(outputs[n]) == labels.shape[1]]
        return matching[0] if matching else floats[0]
    return floats[0]


def _width(values: np.ndarray) -> int:
    return int(np.prod(values.shape[1:])) if values.ndim > 1 else 1


def _infer_form(task: str, values: np.ndarray, labels: np.ndarray | None) -> str:
    """A task with one form reads it (regression, embedding); classification is told apart by values and labels."""
    forms = [name for name, form in FORMS.items() if form.task == task]
    if len(forms) == 1:
        return forms[0]
    unit = bool(np.all((values >= 0.0) & (values <= 1.0)))
    if labels is not None and labels.ndim == 2 and labels.shape[1] > 1:
        return "multilabel-probabilities" if unit else "multilabel-logits"
    if values.shape[1] == 1:
        return "binary-probability" if unit else "binary-logit"
    sums_to_one = bool(np.all(np.abs(values.sum(axis=1) - 1.0) <= _SUM_TOLERANCE))
    return "probabilities" if unit and sums_to_one else "logits"


def _check_threshold(threshold: float | None, form: str, width: int) -> None:
    if threshold is None:
        return
    if not FORMS[form].thresholded or (form in ("logits", "probabilities") and width != 2):
        raise ConfigError(
            f"--threshold applies to binary and multi-label outputs; this output is read as {form} with {width} columns"
        )


def _classes(form: str, width: int, output: str, names: tuple[str, ...], model_classes: tuple[str, ...]) -> tuple[
        str, ...]:  # fmt: skip
    if FORMS[form].task != "classification":
        if names:
            raise ConfigError(f"--labels names classes, but output '{output}' is read as {form}")
        return ()
    if form == "labels":
        if not (names or model_classes):
            raise ConfigError(f"output '{output}' holds class indices: give --labels with the class names")
        return names or model_classes
    count = 2 if form.startswith("binary") else width
    what = "labels" if form in MULTILABEL else "classes"
    for given, source in ((names, "the labels file"), (model_classes, "the model")):
        if given and len(given) != count:
            raise ConfigError(f"{source} names {len(given)} classes, but output '{output}' ({form}) has {count} {what}")
    return names or model_classes or tuple(str(i) for i in range(count))


def encode_targets(readout: Readout, labels: np.ndarray | None, what: str) -> np.ndarray | None:
    """The evaluation labels as the metric compares them: class indices, a 0/1 matrix or float values."""
    if labels is None:
        return None
    if readout.form in SINGLE_LABEL:
        return _class_indices(readout, labels, what)
    if readout.form in MULTILABEL:
        return _label_matrix(readout, labels, what)
    if readout.form == "values":
        return _numeric(labels, what).reshape(len(labels), -1)
    return None


def _class_indices(readout: Readout, labels: np.ndarray, what: str) -> np.ndarray:
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise ConfigError(
            f"{what}: labels have shape {list(labels.shape)}, but output '{readout.output}' ({readout.form}) "
            f"predicts one class per row: give one label per row"
        )
    flat = labels.reshape(-1)
    if readout.label_values:
        return _indices_by_name(readout, flat, what)
    if flat.dtype.kind in "USO":
        raise ConfigError(f"{what}: labels are names; give --labels with the class names in the output's order")
    numbers = _numeric(flat, what)
    indices = numbers.astype(np.int64)
    bad = (indices != numbers) | (indices < 0) | (indices >= len(readout.classes))
    if np.any(bad):
        raise ConfigError(
            f"{what}: label {flat[np.argmax(bad)]!r} is not a class index of output '{readout.output}' "
            f"(0..{len(readout.classes) - 1})"
        )
    return indices


def _indices_by_name(readout: Readout, flat: np.ndarray, what: str) -> np.ndarray:
    position = {name: i for i, name in enumerate(readout.label_values)}
    texts = [label_text(v) for v in flat.tolist()]
    unknown = next((t for t in texts if t not in position), None)
    if unknown is not None:
        shown = ", ".join(readout.label_values[:12]) + (", ..." if len(readout.label_values) > 12 else "")
        raise ConfigError(f"{what}: label '{unknown}' is not one of the model's classes ({shown})")
    return np.asarray([position[t] for t in texts], dtype=np.int64)


def _label_matrix(readout: Readout, labels: np.ndarray, what: str) -> np.ndarray:
    count = len(readout.classes)
    if labels.ndim != 2 or labels.shape[1] != count:
        raise ConfigError(
            f"{what}: labels have shape {list(labels.shape)}, but output '{readout.output}' ({readout.form}) "
            f"has {count} labels per row"
        )
    numbers = _numeric(labels, what)
    if not np.all((numbers == 0) | (numbers == 1)):
        raise ConfigError(f"{what}: multi-label labels must be 0 or 1")
    return numbers.astype(np.int64)


def _numeric(labels: np.ndarray, what: str) -> np.ndarray:
    if labels.dtype.kind not in "biuf":
        raise ConfigError(f"{what}: labels hold {labels.dtype} values, not numbers")
    numbers = labels.astype(np.float64)
    if not np.all(np.isfinite(numbers)):
        raise ConfigError(f"{what}: labels hold NaN or infinity")
    return numbers


def check_target_shape(readout: Readout, targets: np.ndarray | None, output: np.ndarray, what: str) -> None:
    """Regression labels must have as many columns as the output (an embedding-shaped label is refused)."""
    if targets is None or readout.form != "values":
        return
    width = _width(output)
    if targets.shape[1] != width:
        raise ConfigError(
            f"{what}: labels have {targets.shape[1]} value(s) per row, but output '{readout.output}' gives {width}"
        )
