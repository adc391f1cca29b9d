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
    with pytest.raises(ConfigError, match="metric 'f1'"):
        ModelSpec(task="classification", inputs=spec.inputs, metric="f1")
    with pytest.raises(ConfigError, match="invalid processing step"):
        ModelSpec(task="classification", inputs=spec.inputs, metric="accuracy", postprocess=({"op": "explode"},))


@pytest.mark.parametrize(
    ("metric", "expected"), [("accuracy", 0.5), ("top3", 1.0), ("mae", 1.0), ("mse", 1.0), ("cosine", 1.0)]
)
def test_task_metrics_on_known_values(metric: str, expected: float) -> None:
    import numpy as np

    from converter.gates import task_metric

    if metric in ("accuracy", "top3"):
        values = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]])
        labels = np.array([1, 2])
    else:
        values = np.array([[2.0], [4.0]]) if metric != "cosine" else np.array([[1.0, 0.0], [0.0, 2.0]])
        labels = np.array([[1.0], [3.0]]) if metric != "cosine" else np.array([[3.0, 0.0], [0.0, 1.0]])
    assert task_metric(metric, values, labels) == pytest.approx(expected)
