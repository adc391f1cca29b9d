"""The verdicts of :func:`converter.gates.judge`: each budget refuses with its own numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bundles.manifest import Requirements
from converter.exporters import BuiltVariant
from converter.gates import Verdict, judge
from converter.spec import Budgets, ModelSpec, parse_input_spec


def _spec(metric: str = "accuracy", task: str = "classification", **budgets: Any) -> ModelSpec:
    return ModelSpec(task=task, inputs=parse_input_spec("x: float32[-1,4]"), metric=metric,
                     budgets=Budgets(**budgets))  # fmt: skip


def _variant(precision: str) -> BuiltVariant:
    return BuiltVariant("onnx", precision, Path("."), "model.onnx", ["model.onnx"], Requirements(runtime="onnxruntime"))


def _metrics(**overrides: Any) -> dict[str, Any]:
    base = {"max_abs_error": 0.1, "cosine": 0.9999, "top1_agreement": 0.99, "metric_value": 0.97,
            "source_metric_value": 0.975, "metric_drop": 0.005, "output_scale": 30.0, "latency_b1_p95_ms": 0.02,
            "latency_batch": 32, "latency_batch_p50_ms": 0.16, "latency_b1_p50_ms": 0.011, "size_bytes": 50_000,
            "peak_rss_delta_bytes": 1_000_000, "latency_ratio_to_fp32": 0.97,
            "latency_ratio_b1_to_fp32": 0.99}  # fmt: skip
    return {**base, **overrides}


PARENT = {"latency_batch_p50_ms": 0.165, "latency_b1_p50_ms": 0.0112, "size_bytes": 160_000}


def test_a_variant_within_every_budget_passes() -> None:
    spec = _spec(
        max_latency_ms=1.0, max_size_bytes=100_000, max_memory_mb=10, min_top1_agreement=0.98, min_cosine=0.999
    )
    assert judge(_variant("int8-static"), _metrics(), spec, PARENT) == Verdict([], [])


def test_each_budget_refuses_with_its_numbers() -> None:
    spec = _spec(max_latency_ms=0.01, max_size_bytes=40_000, max_memory_mb=0.5, min_top1_agreement=0.995,
                 min_cosine=0.99999)  # fmt: skip
    slow_and_worse = _metrics(latency_ratio_to_fp32=1.5, metric_drop=0.02)
    reasons = judge(_variant("int8-static"), slow_and_worse, spec, PARENT).reasons
    text = " | ".join(reasons)
    for expected in ("drop 0.0200 > budget 0.0100", "top-1 agreement 0.9900 < budget 0.9950",
                     "cosine 0.99990 < budget 0.99999", "p95 latency 0.020 ms > budget 0.010 ms",
                     "size 50000 B > budget 40000 B", "peak memory +1.0 MB > budget 0.5 MB",
                     "1.50x slower than its fp32 parent at batch 32"):  # fmt: skip
        assert expected in text, text


def test_fp32_must_match_the_source_and_quantised_variants_must_be_smaller() -> None:
    spec = _spec()
    changed = judge(_variant("fp32"), _metrics(max_abs_error=0.5), spec, None).reasons
    assert "the export changed the model" in changed[0]
    assert judge(_variant("fp32"), _metrics(max_abs_error=0.02), spec, None).reasons == []  # 1e-3 x output scale 30
    bigger = judge(_variant("fp16"), _metrics(size_bytes=170_000), spec, PARENT).reasons
    assert bigger == ["not smaller than its fp32 parent (170000 B vs 160000 B)"]


def test_dynamic_extremes_may_not_drift_far_beyond_the_eval_error() -> None:
    metrics = _metrics(dynamic_extremes={"x[0]=1": 0.1, "x[0]=32": 0.9})
    reasons = judge(_variant("int8-static"), metrics, _spec(), PARENT).reasons
    assert len(reasons) == 1 and reasons[0].startswith("at x[0]=32 outputs differ from the source by 0.9")


def test_a_variant_slower_only_at_batch_1_is_refused_or_kept_with_the_reason_when_size_is_preferred() -> None:
    slow_single = _metrics(latency_ratio_b1_to_fp32=1.26, latency_b1_p50_ms=0.0141)
    refused = judge(_variant("int8-dynamic"), slow_single, _spec(), PARENT)
    assert refused.reasons == ["1.26x slower than its fp32 parent at batch 1 (p50 0.014 ms vs 0.011 ms; allowed 1.10x)"]
    kept = judge(_variant("int8-dynamic"), slow_single, _spec(prefer="size"), PARENT)
    assert kept.reasons == []
    assert kept.notes == [
        "kept (--prefer size) although 1.26x slower than its fp32 parent at batch 1 (p50 0.014 ms vs 0.011 ms; "
        "allowed 1.10x)"
    ]


def test_drop_budgets_are_in_the_metric_terms_with_per_metric_defaults() -> None:
    # an MAE regressor 0.09 % worse: the default budget for MAE is 2 % of the source's value, not 0.01 absolute
    mae = _metrics(metric="mae", metric_value=11.01, source_metric_value=11.0, metric_drop=0.01)
    assert judge(_variant("int8-dynamic"), mae, _spec("mae", "regression"), PARENT).reasons == []
    worse = _metrics(metric="mae", metric_value=11.3, source_metric_value=11.0, metric_drop=0.3)
    assert judge(_variant("int8-dynamic"), worse, _spec("mae", "regression"), PARENT).reasons == [
        "mae 11.3000 vs source 11.0000 (increase 0.3000 > budget 2% of 11 = 0.22)"
    ]
    relative = _spec(max_drop=0.01, max_drop_relative=True)  # --max-drop 1% on accuracy 0.975: 0.00975
    assert judge(_variant("int8-static"), _metrics(metric_drop=0.0099), relative, PARENT).reasons != []
    assert judge(_variant("int8-static"), _metrics(metric_drop=0.009), relative, PARENT).reasons == []
    assert judge(_variant("int8-static"), _metrics(metric_drop=0.0099), _spec(), PARENT).reasons == []  # 0.01 default
