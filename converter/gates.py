"""Validation gates: measure a built variant in its real runtime against the source model, then judge it.

Measured on the final file, on the registered evaluation data:

- parity with the source outputs: max abs error, mean per-row cosine similarity, and the share of
  class decisions equal to the source's (``top1_agreement``, read as the registration's readout
  says: argmax, a threshold on one logit, per-label decisions);
- the task metric (:mod:`converter.metrics`, read through the readout) and its drop against the
  source's own value, judged against the budget in the metric's terms (absolute or relative);
- latency after warm-up, in :data:`_LATENCY_ROUNDS` rounds: median and p95 over all calls and the
  spread of the round medians, at batch 1 and at the model's typical batch;
- file size and peak memory (growth of the process's peak RSS while loading and running it);
- dynamic dimensions at both ends of their declared range (outputs must keep their parity).

A runner of another process (:class:`converter.workers.WorkerRunner`) times its calls and measures
its memory itself (``time_calls``, ``peak_rss_delta_bytes``). A variant no runtime of this host can
execute is held to what :func:`judge_structure` can check (its size) besides its exporter's
structural checks.

:func:`judge` turns measurements and budgets into a :class:`Verdict`: the reasons a variant is
refused (none when it passes) and the notes of a variant kept despite a finding (``--prefer size``
keeps a quantised variant that is slower than its parent, saying so). A quantised variant is
compared with its float parent of the same target at batch 1 and at the typical batch: slower
(beyond the noise allowance) at either, or not smaller, means refused. Timings are interleaved
with the parent's so that load from other processes hits both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bundles.errors import ConversionError
from converter.datasets import Dataset, batch_sizes_for
from converter.exporters import BuiltVariant, Runner
from converter.metrics import agreement, metric, row_cosine
from converter.readout import Readout, check_target_shape, encode_targets, infer_readout
from converter.runtime_worker import peak_rss_bytes, reset_peak_rss
from converter.spec import ModelSpec, format_drop

_WARMUP_CALLS = 5
_MAX_CALLS = 200
_MAX_TIMING_S = 0.4
_LATENCY_ROUNDS = 5
_EVAL_CHUNK_ROWS = 64
_RATIO_ROUNDS = 7
_RATIO_CALLS = 8


@dataclass
class Reference:
    """The source model's outputs on the evaluation data, how the metric reads them, and its value."""

    outputs: dict[str, np.ndarray]
    readout: Readout
    targets: np.ndarray | None
    metric_value: float | None

    @property
    def primary(self) -> str:
        return self.readout.output


@dataclass
class Verdict:
    """Why a variant is refused (``reasons``) and what was found but accepted (``notes``)."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Measurement:
    """Everything measured for one variant; ``outputs`` stay in memory (golden tolerances), the rest is persisted."""

    metrics: dict[str, Any]
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    runner: Runner | None = field(default=None, repr=False)


def readout_for(spec: ModelSpec, outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> Readout:
    """The registered readout; registrations made before readouts existed get it inferred the same way."""
    if spec.readout is not None:
        return spec.readout
    return infer_readout(spec.task, outputs, labels, spec.request, spec.labels, ())


def task_metric(spec: ModelSpec, readout: Readout, values: np.ndarray, targets: np.ndarray | None,
                reference: np.ndarray) -> float | None:  # fmt: skip
    """The registered metric of ``values`` (the readout's output); None when it needs labels and there are none."""
    chosen = metric(spec.metric_name)
    if chosen.needs_labels and targets is None:
        return None
    return chosen.compute(values, targets, reference, readout.reading)


def reference_for(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], data: Dataset,
                  spec: ModelSpec) -> Reference:  # fmt: skip
    outputs = run_in_chunks(predict, data, spec)
    labels = None if data.labels is None else data.labels[: len(next(iter(outputs.values())))]
    readout = readout_for(spec, outputs, labels)
    targets = encode_targets(readout, labels, "eval file")
    primary = outputs[readout.output]
    check_target_shape(readout, targets, primary, "eval file")
    return Reference(outputs, readout, targets, task_metric(spec, readout, primary, targets, primary))


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
    rss_before = reset_peak_rss()
    runner = open_runner(variant)
    outputs = run_in_chunks(runner.run, data, spec)
    peak_rss_delta = max(0, peak_rss_bytes() - rss_before)
    in_worker = getattr(runner, "peak_rss_delta_bytes", None)
    if callable(in_worker):  # a runtime in another process: its own growth, not this process's
        peak_rss_delta = int(in_worker())
    metrics = parity(outputs, reference, spec)
    metrics.update(size_bytes=variant.size_bytes, peak_rss_delta_bytes=peak_rss_delta)
    metrics.update(latency(runner, data, spec))
    return Measurement(metrics=metrics, outputs=outputs, runner=runner)


def parity(outputs: dict[str, np.ndarray], reference: Reference, spec: ModelSpec) -> dict[str, Any]:
    """Max abs error, cosine and decision agreement against the reference outputs, plus the task metric."""
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
            cosines.extend(row_cosine(actual, expected).tolist())
    primary = outputs[reference.primary][:rows]
    expected_primary = reference.outputs[reference.primary]
    value = task_metric(spec, reference.readout, primary, reference.targets, expected_primary)
    result: dict[str, Any] = {
        "max_abs_error": max_abs,
        "cosine": float(np.mean(cosines)) if cosines else 1.0,
        "metric": spec.metric_name,
        "metric_value": value,
        "source_metric_value": reference.metric_value,
        "metric_drop": _drop(spec, reference.metric_value, value),
        "output_scale": float(np.max(np.abs(expected_primary))) if expected_primary.dtype.kind == "f" else 1.0,
    }
    decided = agreement(primary, expected_primary, reference.readout.reading)
    if decided is not None:
        result["top1_agreement"] = decided
    return result


def _drop(spec: ModelSpec, source: float | None, variant: float | None) -> float | None:
    if source is None or variant is None:
        return None
    return source - variant if spec.higher_is_better else variant - source


def latency_batch(spec: ModelSpec) -> int:
    """The batch size throughput is measured at: the budget's, within the declared batch range."""
    low, high = batch_sizes_for(spec.inputs[0])
    return min(max(spec.budgets.latency_batch, low), high)


def feeds_at(data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of evaluation data (repeated when there are fewer rows)."""
    index = np.arange(batch) % data.rows
    return {name: np.ascontiguousarray(array[index]) for name, array in data.inputs.items()}


def latency(runner: Runner, data: Dataset, spec: ModelSpec) -> dict[str, Any]:
    """Median, p95 and the spread of round medians (ms) at batch 1 (or the fixed batch) and at :func:`latency_batch`."""
    low, _ = batch_sizes_for(spec.inputs[0])
    result: dict[str, Any] = {"latency_batch": latency_batch(spec)}
    for label, batch in (("b1", low), ("batch", latency_batch(spec))):
        rounds = _timed_rounds(runner, feeds_at(data, batch))
        every = [t for r in rounds for t in r]
        medians = [float(np.median(r)) for r in rounds]
        result[f"latency_{label}_p50_ms"] = _ms(np.median(every))
        result[f"latency_{label}_p95_ms"] = _ms(np.percentile(every, 95))
        result[f"latency_{label}_p50_range_ms"] = [_ms(min(medians)), _ms(max(medians))]
    return result


def _timed_rounds(runner: Runner, feeds: dict[str, np.ndarray]) -> list[list[float]]:
    """:data:`_LATENCY_ROUNDS` rounds of timed calls after one warm-up, sharing the time budget."""
    for _ in range(_WARMUP_CALLS):
        runner.run(feeds)
    calls = _MAX_CALLS // _LATENCY_ROUNDS
    budget_s = _MAX_TIMING_S / _LATENCY_ROUNDS
    return [_time_calls(runner, feeds, calls=calls, warmup=0, budget_s=budget_s) for _ in range(_LATENCY_ROUNDS)]


def latency_ratios(parent: Runner, child: Runner, data: Dataset, spec: ModelSpec) -> dict[str, float]:
    """Child / parent latency at batch 1 and at :func:`latency_batch` (one figure when they are the same batch)."""
    low, _ = batch_sizes_for(spec.inputs[0])
    batches = {"latency_ratio_b1_to_fp32": low, "latency_ratio_to_fp32": latency_batch(spec)}
    if low == latency_batch(spec):
        batches = {"latency_ratio_to_fp32": low}
    return {key: latency_ratio(parent, child, feeds_at(data, batch)) for key, batch in batches.items()}


def latency_ratio(parent: Runner, child: Runner, feeds: dict[str, np.ndarray]) -> float:
    """Child / parent latency on ``feeds``, timed in interleaved rounds.

    Each side's figure is its best round median: a burst of load from other processes slows a
    round, never speeds one up, so the quietest round is the closest to the model's own cost.
    """
    parent_rounds: list[float] = []
    child_rounds: list[float] = []
    for runner in (parent, child):
        _time_calls(runner, feeds, calls=_WARMUP_CALLS, warmup=0)
    for _ in range(_RATIO_ROUNDS):
        parent_rounds.append(float(np.median(_time_calls(parent, feeds, calls=_RATIO_CALLS, warmup=0))))
        child_rounds.append(float(np.median(_time_calls(child, feeds, calls=_RATIO_CALLS, warmup=0))))
    return min(child_rounds) / max(min(parent_rounds), 1e-9)


def _time_calls(runner: Runner, feeds: dict[str, np.ndarray], calls: int = _MAX_CALLS,
                warmup: int = _WARMUP_CALLS, budget_s: float = _MAX_TIMING_S) -> list[float]:  # fmt: skip
    timed_inside = getattr(runner, "time_calls", None)
    if callable(timed_inside):  # a runtime in another process times itself: the pipe is not the model's cost
        times: list[float] = timed_inside(feeds, calls, warmup, budget_s)
        return times
    for _ in range(warmup):
        runner.run(feeds)
    times = []
    deadline = time.perf_counter() + budget_s
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
                feeds = resized(data, tensor.name, int(key), size)
                label = f"{tensor.name}[{key}]={size}"
                try:
                    got, want = runner.run(feeds), predict(feeds)
                except ConversionError as e:
                    raise ConversionError(f"fails at {label}: {e}") from e
                results[label] = _max_error(got, want, label)
    return results


def resized(data: Dataset, name: str, axis: int, size: int) -> dict[str, np.ndarray]:
    """Evaluation rows with ``name``'s dimension ``axis`` at ``size`` (rows repeated; other axes cut or zero-padded)."""
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
          parent: dict[str, Any] | None) -> Verdict:  # fmt: skip
    """Why ``variant`` must not be published, and what was accepted; ``parent`` is its fp32 sibling's metrics."""
    budgets = spec.budgets
    verdict = Verdict()
    scale = max(1.0, metrics.get("output_scale", 1.0))
    if variant.precision == "fp32" and metrics["max_abs_error"] > budgets.max_abs_error_fp32 * scale:
        verdict.reasons.append(
            f"fp32 outputs differ from the source by {metrics['max_abs_error']:.3g} "
            f"(> {budgets.max_abs_error_fp32 * scale:.3g}): the export changed the model"
        )
    verdict.reasons.extend(_drop_reasons(metrics, spec))
    verdict.reasons.extend(_parity_budget_reasons(metrics, spec))
    verdict.reasons.extend(_resource_budget_reasons(metrics, spec))
    verdict.reasons.extend(_dynamic_reasons(metrics))
    if parent is not None:
        _judge_against_parent(metrics, parent, spec, verdict)
    return verdict


def _drop_reasons(metrics: dict[str, Any], spec: ModelSpec) -> list[str]:
    drop, source = metrics.get("metric_drop"), metrics.get("source_metric_value")
    if drop is None or source is None:
        return []
    allowed = spec.budgets.allowed_drop(spec.metric_name, source)
    if drop <= allowed + 1e-12:
        return []
    value, relative = spec.budgets.drop_budget(spec.metric_name)
    budget = f"{format_drop(value, relative)} of {source:.4g} = {allowed:.4g}" if relative else f"{allowed:.4f}"
    worse = "increase" if not spec.higher_is_better else "drop"
    return [
        f"{spec.metric_name} {metrics['metric_value']:.4f} vs source {source:.4f} "
        f"({worse} {drop:.4f} > budget {budget})"
    ]


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


def judge_structure(metrics: dict[str, Any], spec: ModelSpec, parent: dict[str, Any] | None) -> list[str]:
    """The budgets a variant that could not be executed here can still be held to: its size."""
    reasons = []
    budget = spec.budgets.max_size_bytes
    if budget is not None and metrics["size_bytes"] > budget:
        reasons.append(f"size {metrics['size_bytes']} B > budget {budget} B")
    if parent is not None and metrics["size_bytes"] >= parent["size_bytes"]:
        reasons.append(f"not smaller than its fp32 parent ({metrics['size_bytes']} B vs {parent['size_bytes']} B)")
    return reasons


def _judge_against_parent(metrics: dict[str, Any], parent: dict[str, Any], spec: ModelSpec,
                          verdict: Verdict) -> None:  # fmt: skip
    slower = _slower_than_parent(metrics, parent, spec)
    if spec.budgets.prefer == "size":
        verdict.notes.extend(f"kept (--prefer size) although {finding}" for finding in slower)
    else:
        verdict.reasons.extend(slower)
    if metrics["size_bytes"] >= parent["size_bytes"]:
        verdict.reasons.append(
            f"not smaller than its fp32 parent ({metrics['size_bytes']} B vs {parent['size_bytes']} B)"
        )


def _slower_than_parent(metrics: dict[str, Any], parent: dict[str, Any], spec: ModelSpec) -> list[str]:
    allowed = spec.budgets.max_latency_ratio
    smallest, _ = batch_sizes_for(spec.inputs[0])
    findings = []
    for key, label, at in (("latency_ratio_b1_to_fp32", "b1", smallest),
                           ("latency_ratio_to_fp32", "batch", metrics["latency_batch"])):  # fmt: skip
        ratio = metrics.get(key)
        if ratio is None or ratio <= allowed:
            continue
        findings.append(
            f"{ratio:.2f}x slower than its fp32 parent at batch {at} (p50 {metrics[f'latency_{label}_p50_ms']:.3f} ms "
            f"vs {parent[f'latency_{label}_p50_ms']:.3f} ms; allowed {allowed:.2f}x)"
        )
    return findings
