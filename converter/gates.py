"""Validation gates: measure a built variant in its real runtime against the source model, then judge it.

Measured on the final file, on the registered evaluation data:

- parity with the source outputs: max abs error, mean per-row cosine similarity, top-1 agreement
  (classification), label agreement for integer outputs;
- the task metric and its drop against the source's own metric (absolute, in the metric's unit);
- latency after warm-up: median and p95 at batch 1 and at the budget's batch size;
- file size and peak memory (growth of the process's peak RSS while loading and running it);
- dynamic dimensions at both ends of their declared range (outputs must keep their parity).

:func:`judge` turns measurements and budgets into the list of reasons a variant is refused (empty
when it passes). A quantised variant is also compared with its float parent of the same target:
slower (beyond the noise allowance) or not smaller means refused. Timings are interleaved with the
parent's so that load from other processes hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundles.errors import ConversionError
from converter.datasets import Dataset, batch_sizes_for
from converter.exporters import BuiltVariant, Runner
from converter.spec import ModelSpec

_WARMUP_CALLS = 5
_MAX_CALLS = 200
_MAX_TIMING_S = 0.4
_EVAL_CHUNK_ROWS = 64
_RATIO_ROUNDS = 7
_RATIO_CALLS = 8


@dataclass
class Reference:
    """The source model's outputs on the evaluation data and its metric value."""

    outputs: dict[str, np.ndarray]
    primary: str
    metric_value: float | None


@dataclass
class Measurement:
    """Everything measured for one variant; ``outputs`` stay in memory (golden tolerances), the rest is persisted."""

    metrics: dict[str, Any]
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    runner: Runner | None = field(default=None, repr=False)


def primary_output(outputs: dict[str, np.ndarray], task: str) -> str:
    """The output the metric and top-1 agreement are computed on: class scores or the prediction."""
    floats = [n for n, v in outputs.items() if v.dtype.kind == "f"]
    if not floats:
        return next(iter(outputs))
    if task == "classification":
        scores = [n for n in floats if outputs[n].ndim == 2 and outputs[n].shape[1] > 1]
        if scores:
            return scores[0]
    return floats[0]


def task_metric(metric: str, values: np.ndarray, labels: np.ndarray | None) -> float | None:
    """The registered metric of ``values`` (primary output) against ``labels``; None without labels."""
    if labels is None:
        return None
    if metric == "accuracy":
        return float(np.mean(np.argmax(values, axis=1) == labels.reshape(-1)))
    if metric in ("top3", "top5"):
        k = int(metric[3:])
        top = np.argsort(-values, axis=1)[:, :k]
        return float(np.mean(np.any(top == labels.reshape(-1, 1), axis=1)))
    predicted = values.reshape(len(values), -1).astype(np.float64)
    expected = labels.reshape(len(labels), -1).astype(np.float64)
    if metric == "mae":
        return float(np.mean(np.abs(predicted - expected)))
    if metric == "mse":
        return float(np.mean((predicted - expected) ** 2))
    return float(np.mean(_row_cosine(predicted, expected)))


def reference_for(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], data: Dataset,
                  spec: ModelSpec) -> Reference:  # fmt: skip
    outputs = run_in_chunks(predict, data, spec)
    primary = primary_output(outputs, spec.task)
    return Reference(outputs, primary, task_metric(spec.metric, outputs[primary], data.labels))


def run_in_chunks(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], data: Dataset,
                  spec: ModelSpec) -> dict[str, np.ndarray]:  # fmt: skip
    """Run over all rows in batches the first input's batch dimension allows; concatenate outputs."""
    low, high = batch_sizes_for(spec.inputs[0])
    step = min(high, _EVAL_CHUNK_ROWS)
    usable = data.rows - data.rows % low
    if usable == 0:
        raise ConversionError(f"the evaluation data has {data.rows} rows, fewer than the model's smallest batch {low}")
    starts = range(0, usable, step)
    parts = [predict(data.take(i, min(i + step, usable))) for i in starts if min(i + step, usable) - i >= low]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def measure(variant: BuiltVariant, open_runner: Callable[[BuiltVariant], Runner], data: Dataset,
            reference: Reference, spec: ModelSpec) -> Measurement:  # fmt: skip
    """Load and run ``variant`` on the evaluation data; parity, metric, size, memory and latency."""
    rss_before = _reset_peak_rss()
    runner = open_runner(variant)
    outputs = run_in_chunks(runner.run, data, spec)
    peak_rss_delta = max(0, _peak_rss_bytes() - rss_before)
    metrics = parity(outputs, reference, spec, data)
    metrics.update(size_bytes=variant.size_bytes, peak_rss_delta_bytes=peak_rss_delta)
    metrics.update(latency(runner, data, spec))
    return Measurement(metrics=metrics, outputs=outputs, runner=runner)


def parity(outputs: dict[str, np.ndarray], reference: Reference, spec: ModelSpec, data: Dataset) -> dict[str, Any]:
    """Max abs error, cosine and agreement against the reference outputs, plus the task metric."""
    rows = len(reference.outputs[reference.primary])
    max_abs = 0.0
    cosines: list[float] = []
    for name, expected in reference.outputs.items():
        actual = outputs.get(name)
        if actual is None or actual.shape[1:] != expected.shape[1:]:
            got = None if actual is None else list(actual.shape)
            raise ConversionError(f"output '{name}' does not match the source (shape {got} vs {list(expected.shape)})")
        actual = actual[:rows]
        if expected.dtype.kind == "f":
            max_abs = max(max_abs, float(np.max(np.abs(actual.astype(np.float64) - expected))))
            cosines.extend(_row_cosine(actual.reshape(rows, -1), expected.reshape(rows, -1)).tolist())
    primary = outputs[reference.primary][:rows]
    expected_primary = reference.outputs[reference.primary]
    value = task_metric(spec.metric, primary, None if data.labels is None else data.labels[:rows])
    result: dict[str, Any] = {
        "max_abs_error": max_abs,
        "cosine": float(np.mean(cosines)) if cosines else 1.0,
        "metric": spec.metric,
        "metric_value": value,
        "source_metric_value": reference.metric_value,
        "metric_drop": _drop(spec, reference.metric_value, value),
        "output_scale": float(np.max(np.abs(expected_primary))) if expected_primary.dtype.kind == "f" else 1.0,
    }
    if spec.task == "classification" and primary.ndim == 2 and primary.shape[1] > 1:
        result["top1_agreement"] = float(np.mean(np.argmax(primary, 1) == np.argmax(expected_primary, 1)))
    return result


def _drop(spec: ModelSpec, source: float | None, variant: float | None) -> float | None:
    if source is None or variant is None:
        return None
    return source - variant if spec.higher_is_better else variant - source


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    same = np.all(np.isclose(a, b, atol=1e-12), axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(same, 1.0, 0.0))


def latency_batch(spec: ModelSpec) -> int:
    """The batch size throughput is measured at: the budget's, within the declared batch range."""
    low, high = batch_sizes_for(spec.inputs[0])
    return min(max(spec.budgets.latency_batch, low), high)


def feeds_at(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of evaluation data (repeated when there are fewer rows)."""
    index = np.arange(batch) % data.rows
    return {name: np.ascontiguousarray(array[index]) for name, array in data.inputs.items()}


def latency(runner: Runner, data: Dataset, spec: ModelSpec) -> dict[str, Any]:
    """Median and p95 in milliseconds at batch 1 (or the fixed batch) and at :func:`latency_batch`."""
    low, _ = batch_sizes_for(spec.inputs[0])
    batch = latency_batch(spec)
    single = _time_calls(runner, feeds_at(data, low))
    many = _time_calls(runner, feeds_at(data, batch))
    return {
        "latency_batch": batch,
        "latency_b1_p50_ms": _ms(np.median(single)),
        "latency_b1_p95_ms": _ms(np.percentile(single, 95)),
        "latency_batch_p50_ms": _ms(np.median(many)),
        "latency_batch_p95_ms": _ms(np.percentile(many, 95)),
    }


def latency_ratio(parent: Runner, child: Runner, data: Dataset, spec: ModelSpec) -> float:
    """Child / parent latency at :func:`latency_batch`, timed in interleaved rounds.

    Each side's figure is its best round median: a burst of load from other processes slows a
    round, never speeds one up, so the quietest round is the closest to the model's own cost.
    """
    feeds = feeds_at(data, latency_batch(spec))
    parent_rounds: list[float] = []
    child_rounds: list[float] = []
    for runner in (parent, child):
        _time_calls(runner, feeds, calls=_WARMUP_CALLS, warmup=0)
    for _ in range(_RATIO_ROUNDS):
        parent_rounds.append(float(np.median(_time_calls(parent, feeds, calls=_RATIO_CALLS, warmup=0))))
        child_rounds.append(float(np.median(_time_calls(child, feeds, calls=_RATIO_CALLS, warmup=0))))
    return min(child_rounds) / max(min(parent_rounds), 1e-9)


def _time_calls(runner: Runner, feeds: dict[str, np.ndarray], calls: int = _MAX_CALLS,
                warmup: int = _WARMUP_CALLS) -> list[float]:  # fmt: skip
    for _ in range(warmup):
        runner.run(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + _MAX_TIMING_S
    while len(times) < calls and (len(times) < 10 or time.perf_counter() < deadline):
        start = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - start)
    return times


def _ms(seconds: Any) -> float:
    return round(float(seconds) * 1000.0, 4)


def dynamic_extremes(runner: Runner, predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                     data: Dataset, spec: ModelSpec) -> dict[str, float]:  # fmt: skip
    """Max abs error against the source at both ends of every declared dynamic range."""
    results: dict[str, float] = {}
    for tensor in spec.inputs:
        for key, bounds in sorted(tensor.dim_ranges.items()):
            for size in sorted(set(bounds)):
                feeds = _resized(data, tensor.name, int(key), size)
                label = f"{tensor.name}[{key}]={size}"
                try:
                    got, want = runner.run(feeds), predict(feeds)
                except ConversionError as e:
                    raise ConversionError(f"fails at {label}: {e}") from e
                results[label] = _max_error(got, want, label)
    return results


def _resized(data: Dataset, name: str, axis: int, size: int) -> dict[str, np.ndarray]:
    if axis == 0:
        return feeds_at(data, size)
    feeds = feeds_at(data, 2)
    array = feeds[name]
    if array.shape[axis] >= size:
        feeds[name] = np.ascontiguousarray(np.take(array, np.arange(size), axis=axis))
    else:
        pad = [(0, 0)] * array.ndim
        pad[axis] = (0, size - array.shape[axis])
        feeds[name] = np.pad(array, pad)
    return feeds


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray], label: str) -> float:
    worst = 0.0
    for name, expected in want.items():
        actual = got.get(name)
        if actual is None or actual.shape != expected.shape:
            shape = None if actual is None else list(actual.shape)
            raise ConversionError(
                f"at {label} output '{name}' has shape {shape}, the source gives {list(expected.shape)}"
            )
        if expected.dtype.kind == "f":
            worst = max(worst, float(np.max(np.abs(actual.astype(np.float64) - expected))))
    return worst


def judge(variant: BuiltVariant, metrics: dict[str, Any], spec: ModelSpec,
          parent: dict[str, Any] | None) -> list[str]:  # fmt: skip
    """Why ``variant`` must not be published (empty list: it passes). ``parent`` is its fp32 sibling's metrics."""
    budgets = spec.budgets
    reasons: list[str] = []
    scale = max(1.0, metrics.get("output_scale", 1.0))
    if variant.precision == "fp32" and metrics["max_abs_error"] > budgets.max_abs_error_fp32 * scale:
        reasons.append(
            f"fp32 outputs differ from the source by {metrics['max_abs_error']:.3g} "
            f"(> {budgets.max_abs_error_fp32 * scale:.3g}): the export changed the model"
        )
    drop = metrics.get("metric_drop")
    if drop is not None and drop > budgets.max_drop:
        reasons.append(
            f"{spec.metric} {metrics['metric_value']:.4f} vs source {metrics['source_metric_value']:.4f} "
            f"(drop {drop:.4f} > budget {budgets.max_drop:.4f})"
        )
    reasons.extend(_parity_budget_reasons(metrics, spec))
    reasons.extend(_resource_budget_reasons(metrics, spec))
    reasons.extend(_dynamic_reasons(metrics))
    if parent is not None:
        reasons.extend(_parent_reasons(metrics, parent, spec))
    return reasons


def _parity_budget_reasons(metrics: dict[str, Any], spec: ModelSpec) -> list[str]:
    reasons = []
    budgets = spec.budgets
    agreement = metrics.get("top1_agreement")
    if budgets.min_top1_agreement is not None and agreement is not None and agreement < budgets.min_top1_agreement:
        reasons.append(f"top-1 agreement {agreement:.4f} < budget {budgets.min_top1_agreement:.4f}")
    if budgets.min_cosine is not None and metrics["cosine"] < budgets.min_cosine:
        reasons.append(f"cosine {metrics['cosine']:.5f} < budget {budgets.min_cosine:.5f}")
    return reasons


def _resource_budget_reasons(metrics: dict[str, Any], spec: ModelSpec) -> list[str]:
    reasons = []
    budgets = spec.budgets
    if budgets.max_latency_ms is not None and metrics["latency_b1_p95_ms"] > budgets.max_latency_ms:
        reasons.append(f"p95 latency {metrics['latency_b1_p95_ms']:.3f} ms > budget {budgets.max_latency_ms:.3f} ms")
    if budgets.max_size_bytes is not None and metrics["size_bytes"] > budgets.max_size_bytes:
        reasons.append(f"size {metrics['size_bytes']} B > budget {budgets.max_size_bytes} B")
    peak_mb = metrics["peak_rss_delta_bytes"] / 1e6
    if budgets.max_memory_mb is not None and peak_mb > budgets.max_memory_mb:
        reasons.append(f"peak memory +{peak_mb:.1f} MB > budget {budgets.max_memory_mb:.1f} MB")
    return reasons


def _dynamic_reasons(metrics: dict[str, Any]) -> list[str]:
    extremes: dict[str, float] = metrics.get("dynamic_extremes", {})
    allowed = 2.0 * metrics["max_abs_error"] + 1e-4 * max(1.0, metrics.get("output_scale", 1.0))
    return [
        f"at {label} outputs differ from the source by {error:.3g} (> {allowed:.3g} allowed from the eval run)"
        for label, error in extremes.items()
        if error > allowed
    ]


def _parent_reasons(metrics: dict[str, Any], parent: dict[str, Any], spec: ModelSpec) -> list[str]:
    reasons = []
    ratio = metrics.get("latency_ratio_to_fp32")
    batch = metrics["latency_batch"]
    if ratio is not None and ratio > spec.budgets.max_latency_ratio:
        reasons.append(
            f"{ratio:.2f}x slower than its fp32 parent at batch {batch} "
            f"(p50 {metrics['latency_batch_p50_ms']:.3f} ms vs {parent['latency_batch_p50_ms']:.3f} ms; "
            f"allowed {spec.budgets.max_latency_ratio:.2f}x)"
        )
    if metrics["size_bytes"] >= parent["size_bytes"]:
        reasons.append(f"not smaller than its fp32 parent ({metrics['size_bytes']} B vs {parent['size_bytes']} B)")
    return reasons


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    return _status_bytes("VmHWM") or _status_bytes("VmRSS")


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
