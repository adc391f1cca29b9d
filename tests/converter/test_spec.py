"""The command-line input spec and the budgets round-trip and refuse malformed text."""

from __future__ import annotations

import pytest

from bundles.errors import ConfigError
from converter.spec import Budgets, ModelSpec, format_tensor_spec, parse_input_spec


def test_dynamic_dims_get_ranges_and_format_back() -> None:
    (x, mask) = parse_input_spec("x: float32[-1,1,8,8]; mask: int64[1..64, 128]")
    assert x.shape == (-1, 1, 8, 8) and x.dim_ranges == {"0": (1, 32)}
    assert mask.shape == (-1, 128) and mask.dim_ranges == {"0": (1, 64)}
    assert format_tensor_spec(x) == "x: float32[1..32,1,8,8]"
    assert parse_input_spec(format_tensor_spec(mask)) == (mask,)


@pytest.mark.parametrize(
    "text",
    ["x float32[1,2]", "x: float31[1]", "x: float32[0,2]", "x: float32[4..2]", "x: float32[1]; x: float32[2]", ";"],
)
def test_malformed_specs_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_input_spec(text)


def test_model_spec_round_trips_through_its_persisted_form() -> None:
    spec = ModelSpec(task="classification", inputs=parse_input_spec("x: float32[-1,4]"), metric="top3",
                     budgets=Budgets(max_drop=0.02, max_latency_ms=5.0), labels=("a", "b"))  # fmt: skip
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="metric 'auc' is unknown; valid task/metric pairs: classification: accuracy"):
        ModelSpec(task="classification", inputs=spec.inputs, metric="auc")
    with pytest.raises(ConfigError, match="invalid processing step"):
        ModelSpec(task="classification", inputs=spec.inputs, metric="accuracy", postprocess=({"op": "explode"},))


@pytest.mark.parametrize(
    ("metric", "form", "values", "labels", "expected"),
    [
        ("accuracy", "logits", [[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]], [1, 2], 0.5),
        ("top3", "logits", [[0.1, 0.9, 0.0, 0.3], [0.8, 0.1, 0.2, 0.0]], [1, 3], 0.5),
        ("accuracy", "binary-logit", [[2.0], [-1.0], [0.5], [-3.0]], [1, 0, 0, 0], 0.75),
        ("accuracy", "binary-probability", [[0.9], [0.2], [0.6], [0.4]], [1, 0, 0, 0], 0.75),
        ("f1", "binary-logit", [[2.0], [-1.0], [0.5], [-3.0]], [1, 0, 0, 1], 0.5),
        ("label_accuracy", "multilabel-logits", [[1.0, -1.0], [-2.0, -3.0]], [[1, 1], [0, 0]], 0.75),
        ("mae", "values", [[2.0], [4.0]], [1.0, 3.0], 1.0),
        ("rmse", "values", [[2.0], [5.0]], [1.0, 3.0], (2.5) ** 0.5),
        ("r2", "values", [[1.0], [3.0], [5.0]], [1.0, 3.0, 5.0], 1.0),
        ("cosine", "embedding", [[1.0, 0.0], [0.0, 2.0]], None, 1.0),
    ],
)
def test_task_metrics_on_known_values(metric: str, form: str, values: list[list[float]], labels: list[object] | None,
                                      expected: float) -> None:  # fmt: skip
    import numpy as np

    from converter.metrics import METRICS, Reading

    scores = np.asarray(values)
    targets = None if labels is None else np.asarray(labels)
    classes = 2 if form.startswith("binary") else scores.shape[1]
    reading = Reading(form=form, classes=classes)
    assert METRICS[metric].compute(scores, targets, scores, reading) == pytest.approx(expected)


def test_drop_budgets_parse_as_absolute_or_relative() -> None:
    from converter.spec import parse_drop

    assert parse_drop("0.01") == (0.01, False)
    assert parse_drop("2%") == (pytest.approx(0.02), True)
    assert parse_drop("1e-3") == (0.001, False)
    for bad in ("-1", "two", "2%%", ""):
        with pytest.raises(ConfigError, match="--max-drop"):
            parse_drop(bad)
    assert Budgets().describe("mae").startswith("max_drop=2% (mae default), ")


def test_every_binary_form_reads_a_threshold_as_the_probability_of_class_1() -> None:
    import numpy as np

    from converter.metrics import METRICS, Reading

    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.5]])  # probability of class 1: 0.73, 0.27, 0.62
    probability = np.exp(logits[:, 1:]) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([1, 0, 1])  # at threshold 0.7 the third row is class 0: accuracy 2/3 (at 0.5 it would be 1)
    forms = {"logits": logits, "probabilities": np.hstack([1 - probability, probability]),
             "binary-logit": logits[:, 1:] - logits[:, :1], "binary-probability": probability}  # fmt: skip
    for form, scores in forms.items():
        reading = Reading(form=form, threshold=0.7, classes=2)
        assert METRICS["accuracy"].compute(scores, labels, scores, reading) == pytest.approx(2 / 3), form
        assert METRICS["accuracy"].compute(scores, labels, scores, Reading(form=form, classes=2)) == 1.0, form
