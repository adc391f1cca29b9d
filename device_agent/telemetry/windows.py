"""Metric windows on the device: counters and histograms that the server merges by addition.

One :class:`WindowAccumulator` per (model, bundle version) and window. Answers arrive two ways:
routine ones (local, no fallback: most requests) as :class:`RoutineBatch` es of thousands, captured
on the request path by ``device_agent.telemetry.capture`` (:meth:`WindowAccumulator.bin_routine`);
any other one by :meth:`WindowAccumulator.observe`, which appends it to a list. Either way the numpy
work (binning inputs on the drift baseline's edges, latency buckets, output distribution, constraint
checks) runs vectorised over many answers: every batch, every :data:`BIN_EVERY_ROWS` observed
requests, and when the window closes (:meth:`WindowAccumulator.close`, which returns the payload
``docs/telemetry.md`` defines).

:class:`BinPlan` is compiled once per manifest: the feature and output bins and the valid ranges,
as padded numpy arrays, so that binning 256 rows of 64 features is a handful of numpy calls.

Aggregate features (``FeatureSpec.extra["aggregate"]`` = ``mean``, ``std``, ``min`` or ``max``, which
the converter declares for image-like inputs as ``<tensor>.mean`` etc.) are not an element of the
tensor: each sample's statistic over its whole flattened tensor is computed (vectorised, per pending
batch) and binned on the baseline's edges like any numeric feature.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from bundles.manifest import FeatureSpec, Histogram, Manifest
from bundles.readout import SCORE_FORMS, decide_classes
from bundles.windows import LATENCY_EDGES_MS, MERGED_FIELDS, TOKENS_PER_S_EDGES, merge_fields

"""Fixed latency bucket edges (0.01 ms to 100 s, ten per decade); the server has the same list."""
_LATENCY_EDGES = np.asarray(LATENCY_EDGES_MS)
BIN_EVERY_ROWS = 256
"""Pending requests of the general way (:meth:`WindowAccumulator.observe`) are binned in one vectorised
pass when this many have accumulated; routine answers go through ``device_agent.telemetry.capture``."""
BIN_BLOCK_ROWS = 512
"""Rows binned per numpy pass: wide feature sets in bigger blocks leave the CPU's caches and slow down."""
FALLBACK_REASONS = ("local_error", "not_ready", "deadline", "low_confidence")
VIOLATIONS = ("nan_output", "output_out_of_range", "input_out_of_range", "unknown_category")


@dataclass(frozen=True)
class TensorBins:
    """Numeric features of one input tensor: their flat indices and padded interior edges."""

    tensor: str
    names: tuple[str, ...]
    columns: np.ndarray  # [n_features] flat index of each feature in a row
    interior: np.ndarray  # [n_features, max_bins - 1] interior edges, padded with +inf
    bins: np.ndarray  # [n_features] number of bins of each feature
    offsets: np.ndarray  # [n_features] start of each feature's bins in the flat count vector
    low: np.ndarray  # [n_features] valid minimum (-inf if none)
    high: np.ndarray  # [n_features] valid maximum (+inf if none)
    first_edge: np.ndarray | None = None  # [n_features] when every feature has equal-width bins
    width: np.ndarray | None = None  # [n_features] bin width of each feature (equal-width case)
    bins_per_unit: np.ndarray | None = None  # [n_features] ``1 / width``: multiplying is cheaper than dividing
    all_columns: bool = False  # the features are exactly the row's values in order (no column gather needed)
    bin_floor: np.ndarray | None = None  # [n_features] each feature's first bin in the flat counts, as floats
    bin_ceiling: np.ndarray | None = None  # [n_features] each feature's last bin in the flat counts, as floats
    float32: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # the four above in float32
    common_range: tuple[float, float] | None = None  # (min, max) when every feature has the same valid range

    @property
    def total_bins(self) -> int:
        return int(self.bins.sum())


AGGREGATES: dict[str, Any] = {
    "mean": lambda m: m.mean(axis=1),
    "std": lambda m: m.std(axis=1),  # population std, as the converter's baseline
    "min": lambda m: m.min(axis=1),
    "max": lambda m: m.max(axis=1),
}
"""Per-sample statistics of an aggregate feature over its [rows, values] tensor."""


@dataclass(frozen=True)
class AggregateBins:
    """Aggregate features of one input tensor: the statistic of each, binned through ``bins``.

    ``bins.columns`` index the [rows, statistics] matrix built from ``stats`` (in that order).
    """

    stats: tuple[str, ...]
    bins: TensorBins


@dataclass(frozen=True)
class CategoryBins:
    """A categorical feature: where it is and its categories in baseline order."""

    name: str
    tensor: str
    column: int
    categories: tuple[str, ...]


@dataclass(frozen=True)
class OutputDecision:
    """The readout of a class histogram whose output holds scores (a CNN's logits, a binary MLP's one logit):
    a window counts ``decide_classes(scores, form, threshold)``, as the converter did for the baseline."""

    form: str
    threshold: float | None = None

    def counts(self, hist: Histogram, scores: np.ndarray) -> np.ndarray:
        """Counts per class of the rows of ``scores`` ([rows, ...]); rows deciding no known class are dropped."""
        decided = decide_classes(scores, self.form, self.threshold)
        decided = decided[(decided >= 0) & (decided < len(hist.categories))]
        return np.bincount(decided, minlength=len(hist.categories))


@dataclass(frozen=True)
class BinPlan:
    """Everything the accumulator needs from a manifest, compiled once."""

    numeric: tuple[TensorBins, ...] = ()
    categorical: tuple[CategoryBins, ...] = ()
    aggregates: tuple[AggregateBins, ...] = ()
    output: Histogram | None = None
    output_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    float_outputs: tuple[str, ...] = ()  # the first float model output: NaN/inf there is what reaches the answer
    fixed_rows: frozenset[str] = frozenset()  # inputs whose every request row has one shape (no preprocessing)
    decision: OutputDecision | None = None  # how the categorical output histogram's classes are read from scores

    @property
    def numeric_outputs(self) -> tuple[str, ...]:
        """The outputs a window reads as numbers: NaN checks, declared ranges, a numeric output histogram."""
        names = [*self.float_outputs, *self.output_ranges]
        if self.output is not None and not self.output.categories:
            names.append(self.output.name)
        return tuple(dict.fromkeys(names))

    @property
    def tensors(self) -> frozenset[str]:
        """The input tensors that hold a feature (only these are kept for binning)."""
        tensors = [t.tensor for t in self.numeric] + [c.tensor for c in self.categorical]
        return frozenset(tensors + [a.bins.tensor for a in self.aggregates])


COUNTERS_ONLY = BinPlan()
"""The plan of a window with histograms turned off (``TelemetrySettings.histograms``): counters and latencies."""


def compile_plan(manifest: Manifest | None) -> BinPlan:
    """The bin plan of a manifest: baseline features located through the feature schema."""
    if manifest is None:
        return BinPlan()
    specs = {f.name: f for f in manifest.features}
    default_tensor = manifest.inputs[0].name
    numeric: dict[str, list[tuple[FeatureSpec, Histogram]]] = {}
    aggregates: dict[str, list[tuple[FeatureSpec, Histogram]]] = {}
    categorical: list[CategoryBins] = []
    for hist in manifest.drift_baseline.features:
        spec = specs.get(hist.name) or FeatureSpec(hist.name, tensor=default_tensor)
        tensor = spec.tensor or default_tensor
        if hist.categories:
            categorical.append(CategoryBins(hist.name, tensor, spec.index, hist.categories))
        elif aggregate_of(spec) is not None:
            aggregates.setdefault(tensor, []).append((spec, hist))
        else:
            numeric.setdefault(tensor, []).append((spec, hist))
    return BinPlan(
        numeric=tuple(_tensor_bins(tensor, pairs) for tensor, pairs in numeric.items()),
        categorical=tuple(categorical),
        aggregates=tuple(_aggregate_bins(tensor, pairs) for tensor, pairs in aggregates.items()),
        output=manifest.drift_baseline.output,
        output_ranges=_output_ranges(manifest),
        float_outputs=tuple(t.name for t in manifest.outputs if t.dtype.startswith("float"))[:1],
        fixed_rows=_fixed_rows(manifest),
        decision=_output_decision(manifest),
    )


def _output_decision(manifest: Manifest) -> OutputDecision | None:
    """The readout's decision when the output histogram counts classes of a score output (None otherwise)."""
    hist, readout = manifest.drift_baseline.output, manifest.readout
    if hist is None or not hist.categories or readout is None or readout.form not in SCORE_FORMS:
        return None
    if readout.output != hist.name:  # the histogram counts a label output (scikit-learn's ``label``)
        return None
    return OutputDecision(readout.form, readout.threshold)


def _fixed_rows(manifest: Manifest) -> frozenset[str]:
    """Inputs whose rows the predictor holds to one shape: every dimension after the batch one fixed, and
    no preprocessing between the request and that check (so the request's array is what was checked)."""
    if manifest.preprocess:
        return frozenset()
    return frozenset(t.name for t in manifest.inputs if len(t.shape) >= 1 and -1 not in t.shape[1:])


def aggregate_of(spec: FeatureSpec) -> str | None:
    """The statistic an aggregate feature summarises its tensor by (None for an element feature)."""
    stat = spec.extra.get("aggregate")
    return stat if isinstance(stat, str) and stat in AGGREGATES else None


def _aggregate_bins(tensor: str, pairs: list[tuple[FeatureSpec, Histogram]]) -> AggregateBins:
    """Aggregates binned like numeric features, their columns being the statistics' positions."""
    stats = tuple(str(aggregate_of(spec)) for spec, _ in pairs)
    located = [(dataclasses.replace(spec, index=position), hist) for position, (spec, hist) in enumerate(pairs)]
    return AggregateBins(stats, _tensor_bins(tensor, located))


def _tensor_bins(tensor: str, pairs: list[tuple[FeatureSpec, Histogram]]) -> TensorBins:
    bins = np.array([len(h.edges) - 1 for _, h in pairs], dtype=np.int64)
    edges = [np.asarray(h.edges) for _, h in pairs]
    uniform = all(np.allclose(np.diff(e), (e[-1] - e[0]) / (len(e) - 1), rtol=1e-9, atol=0) for e in edges)
    offsets = np.concatenate([[0], np.cumsum(bins)[:-1]]).astype(np.int64)
    interior = np.full((len(pairs), max(int(bins.max()) - 1, 1)), np.inf)
    for row, (_, hist) in enumerate(pairs):
        inner = hist.edges[1:-1]
        interior[row, : len(inner)] = inner
    return TensorBins(
        tensor=tensor,
        names=tuple(h.name for _, h in pairs),
        columns=np.array([s.index for s, _ in pairs], dtype=np.int64),
        interior=interior,
        bins=bins,
        offsets=offsets,
        low=np.array([-np.inf if s.min is None else s.min for s, _ in pairs]),
        high=np.array([np.inf if s.max is None else s.max for s, _ in pairs]),
        first_edge=np.array([e[0] for e in edges]) if uniform else None,
        width=np.array([(e[-1] - e[0]) / (len(e) - 1) for e in edges]) if uniform else None,
        bins_per_unit=np.array([(len(e) - 1) / (e[-1] - e[0]) for e in edges]) if uniform else None,
        all_columns=[s.index for s, _ in pairs] == list(range(len(pairs))),
        bin_floor=offsets.astype(np.float64),
        bin_ceiling=(offsets + bins - 1).astype(np.float64),
        float32=_float32_constants(edges, offsets, bins) if uniform else None,
        common_range=_common_range(pairs),
    )


def _float32_constants(
    edges: list[np.ndarray], offsets: np.ndarray, bins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First edge, bins per unit, first and last flat bin of equal-width features, in float32."""
    first = np.array([e[0] for e in edges], dtype=np.float32)
    scale = np.array([(len(e) - 1) / (e[-1] - e[0]) for e in edges], dtype=np.float32)
    return first, scale, offsets.astype(np.float32), (offsets + bins - 1).astype(np.float32)


def _common_range(pairs: list[tuple[FeatureSpec, Histogram]]) -> tuple[float, float] | None:
    """The valid range shared by every feature (``-inf``/``inf`` where undeclared), or None if they differ."""
    ranges = {(-np.inf if s.min is None else s.min, np.inf if s.max is None else s.max) for s, _ in pairs}
    return next(iter(ranges)) if len(ranges) == 1 else None


def _output_ranges(manifest: Manifest) -> dict[str, tuple[float, float]]:
    """Declared output ranges: an output TensorSpec may carry ``"range": [min, max]`` (kept in extra)."""
    ranges: dict[str, tuple[float, float]] = {}
    for spec in manifest.outputs:
        value = spec.extra.get("range")
        if isinstance(value, list) and len(value) == 2:
            ranges[spec.name] = (float(value[0]), float(value[1]))
    return ranges


def rows_of(array: Any) -> np.ndarray:
    """A tensor as [rows, values-per-row] (batch first; a 1-D tensor is one row)."""
    arr = np.asarray(array)
    if arr.ndim <= 1:
        return arr.reshape(1, -1)
    return arr.reshape(arr.shape[0], -1)


@dataclass(frozen=True)
class RoutineBatch:
    """Routine answers (local, no fallback, one row each) gathered by ``device_agent.telemetry.capture``:
    their feature tensor as [rows, values], the outputs a window reads as records (one field per output),
    the count of each label and their latencies."""

    tensor: str
    inputs: np.ndarray  # [rows, values]
    outputs: np.ndarray  # records, one field per output read
    label_counts: Mapping[Any, int]  # how many answers gave each label (empty without a categorical output histogram)
    latencies_ms: np.ndarray  # [rows]

    def __len__(self) -> int:
        return len(self.latencies_ms)


class WindowAccumulator:
    """Counts and histograms of one (model, version) over one window; see the module docstring."""

    def __init__(
        self, model: str, version: int, plan: BinPlan, start: dt.datetime, end: dt.datetime,
        on_full: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        """``on_full``: called when :data:`BIN_EVERY_ROWS` requests are pending; True when someone else
        (the recorder's binning thread) takes them, else they are binned on the spot."""
        self.model, self.version, self.plan = model, version, plan
        self.id = uuid.uuid4().hex  # one id for the window, whether it is closed or recovered from a checkpoint
        self.on_full = on_full
        self.start, self.end = start, end
        self.counters: dict[str, Any] = {
            "requests": 0, "rows": 0, "errors": 0, "fallbacks": 0, "low_confidence": 0,
            "sources": {}, "fallback_reasons": {}, "violations": dict.fromkeys(VIOLATIONS, 0), "captured": {},
        }  # fmt: skip
        self._pending: list[tuple[Any, Mapping[str, np.ndarray] | None, str | None, float, str | None]] = []
        self._latency_counts = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        self._numeric_counts = [np.zeros(t.total_bins, dtype=np.int64) for t in plan.numeric]
        self._aggregate_counts = [np.zeros(a.bins.total_bins, dtype=np.int64) for a in plan.aggregates]
        self._category_counts = [np.zeros(len(c.categories), dtype=np.int64) for c in plan.categorical]
        self._output_counts = np.zeros(len(plan.output.freqs) if plan.output else 0, dtype=np.int64)
        self.shadow: dict[str, Any] = {"compared": 0, "agreed": 0, "errors": 0, "latency_ms_sum": 0.0}
        self.llm: dict[str, Any] | None = None  # a language model's generations, once it has one
        self._keep = tuple(plan.tensors)
        self._single = self._keep[0] if len(self._keep) == 1 else None  # the one tensor holding features

    def observe(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        source: str | None,
        latency_ms: float,
        fallback_reason: str | None,
        inputs_private: bool = False,
    ) -> None:
        """Note one request: a copy of the inputs that hold features, and references to the rest.

        ``inputs_private``: the arrays are already a private copy (the serving pipeline's), kept as is.

        Everything else (counters included) is deferred to :meth:`bin_pending`, so this costs about a
        microsecond; the request path never waits on numpy work except once every
        :data:`BIN_EVERY_ROWS` requests.
        """
        if inputs_private and len(inputs) == 1 and self._single in inputs:
            kept = inputs  # the caller's private copy of the one tensor with features: kept whole (the usual case)
        else:
            kept = self._copy_kept(inputs, inputs_private)
        pending = self._pending
        pending.append((kept, outputs if source == "local" else None, source, latency_ms, fallback_reason))
        if len(pending) >= BIN_EVERY_ROWS and (
            self.on_full is None or len(pending) >= 8 * BIN_EVERY_ROWS or not self.on_full()
        ):
            self.bin_pending()  # no binning thread, or it lags behind

    def _copy_kept(self, inputs: Mapping[str, np.ndarray], inputs_private: bool) -> Mapping[str, np.ndarray]:
        """The input tensors that hold features, copied unless private (the others are not kept)."""
        keep = self._keep
        if len(keep) == 1:
            name = keep[0]
            value = inputs.get(name)
            if value is None:
                return {}
            return {name: value if inputs_private else np.array(value)}
        return {k: np.array(inputs[k]) for k in keep if k in inputs} if keep else inputs

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, stop_reason: str,
                           ttft_ms: float | None, tokens_per_s: float | None) -> None:  # fmt: skip
        """Note one generation of a language model (TTFT and decode-speed histograms, token sums, stop reason)."""
        if self.llm is None:
            self.llm = {
                "generations": 0, "prompt_tokens": 0, "completion_tokens": 0, "stop_reasons": {},
                "ttft_ms": {"counts": [0] * (len(LATENCY_EDGES_MS) + 1)},
                "tokens_per_s": {"counts": [0] * (len(TOKENS_PER_S_EDGES) + 1)},
            }  # fmt: skip
        llm = self.llm
        llm["generations"] += 1
        llm["prompt_tokens"] += int(prompt_tokens)
        llm["completion_tokens"] += int(completion_tokens)
        llm["stop_reasons"][stop_reason] = llm["stop_reasons"].get(stop_reason, 0) + 1
        if ttft_ms is not None:
            llm["ttft_ms"]["counts"][bisect.bisect_right(LATENCY_EDGES_MS, ttft_ms)] += 1
        if tokens_per_s is not None:
            llm["tokens_per_s"]["counts"][bisect.bisect_right(TOKENS_PER_S_EDGES, tokens_per_s)] += 1

    def count_capture(self, reason: str) -> None:
        """Count a sample kept for upload, by capture reason."""
        captured = self.counters["captured"]
        captured[reason] = captured.get(reason, 0) + 1

    def bin_pending(self) -> None:
        """Count and bin every pending request in one pass (C-level loops: zip, Counter, numpy)."""
        pending, self._pending = self._pending, []
        if pending:
            kept, maybe_outputs, sources_of, latencies, reasons = zip(*pending, strict=True)
            self._count(sources_of, reasons)
            self._bin_requests(kept, tuple(o for o in maybe_outputs if o is not None), latencies)

    def bin_routine(self, batch: RoutineBatch) -> None:
        """Count and bin a batch of routine answers (``device_agent.telemetry.capture``)."""
        n = len(batch)
        counters = self.counters
        counters["requests"] += n
        counters["rows"] += n
        counters["sources"]["local"] = counters["sources"].get("local", 0) + n
        self._bin_latencies(batch.latencies_ms)
        if self._keep:
            for start in range(0, n, BIN_BLOCK_ROWS):  # blocks that stay in the CPU's caches
                self._bin_tensors({batch.tensor: batch.inputs[start : start + BIN_BLOCK_ROWS]})
        fields = batch.outputs.dtype.names or ()
        matrices = {name: batch.outputs[name].reshape(n, -1) for name in fields}
        self._check_output_ranges(matrices)
        for name in self.plan.float_outputs:
            if name in matrices:  # (not in a batch captured for another plan: histograms were just turned on)
                counters["violations"]["nan_output"] += _rows_not_finite(matrices[name])
        hist = self.plan.output
        if hist is not None:
            if hist.categories and batch.label_counts:
                self._output_counts += _category_counts(hist, batch.label_counts)
            elif hist.name in matrices:  # numbers, or the classes decided from scores, as observe() bins
                self._output_counts += _scores_histogram(hist, self.plan.decision, matrices[hist.name])

    def _bin_latencies(self, latencies: Sequence[float] | np.ndarray) -> None:
        if not isinstance(latencies, np.ndarray):
            latencies = np.fromiter(latencies, np.float64, len(latencies))
        idx = np.searchsorted(_LATENCY_EDGES, latencies, side="right")
        self._latency_counts += np.bincount(idx, minlength=len(LATENCY_EDGES_MS) + 1)

    def _bin_requests(
        self,
        kept: Sequence[Mapping[str, np.ndarray]],
        answered: Sequence[Mapping[str, np.ndarray]],
        latencies: Sequence[float],
    ) -> None:
        """Latency, input and output histograms (and the row count) of a batch of requests."""
        self._bin_latencies(latencies)
        rows = self._bin_inputs(kept) if self._keep else None
        self.counters["rows"] += rows if rows is not None else sum(_row_count(k) for k in kept)
        if answered:
            self._bin_outputs(answered)

    def _count(self, sources: tuple[str | None, ...], reasons: tuple[str | None, ...]) -> None:
        counters = self.counters
        counters["requests"] += len(sources)
        if sources.count("local") == len(sources) and reasons.count(None) == len(reasons):  # all routine: C counts
            counters["sources"]["local"] = counters["sources"].get("local", 0) + len(sources)
            return
        for (source, reason), n in Counter(zip(sources, reasons, strict=True)).items():
            if source is None:
                counters["errors"] += n
            else:
                counters["sources"][source] = counters["sources"].get(source, 0) + n
            if reason is not None:
                counters["fallback_reasons"][reason] = counters["fallback_reasons"].get(reason, 0) + n
                counters["low_confidence"] += n if reason == "low_confidence" else 0
                counters["fallbacks"] += n if source is not None and source != "local" else 0

    def _bin_inputs(self, pending: Sequence[Mapping[str, np.ndarray]]) -> int | None:
        """Bin the kept input tensors; the rows binned (None when no tensor could be stacked)."""
        by_tensor = _stack_by_tensor(pending, self._keep)
        self._bin_tensors(by_tensor)
        first = next(iter(by_tensor.values()), None)
        return None if first is None or len(by_tensor) != len(self._keep) else int(first.shape[0])

    def _bin_tensors(self, by_tensor: Mapping[str, np.ndarray]) -> None:
        """Bin [rows, values] matrices of input tensors by name on the plan's features."""
        for i, plan in enumerate(self.plan.numeric):
            matrix = by_tensor.get(plan.tensor)
            if matrix is None or matrix.shape[1] <= int(plan.columns.max()):
                continue
            values = _feature_values(plan, matrix)
            outside = _rows_out_of_range(plan, values)
            self.counters["violations"]["input_out_of_range"] += outside
            self._numeric_counts[i] += _bin_numeric(plan, values, all_finite=True if outside == 0 else None)
        for i, aggregate in enumerate(self.plan.aggregates):
            matrix = by_tensor.get(aggregate.bins.tensor)
            if matrix is not None and matrix.shape[1] and matrix.dtype.kind in "biuf":
                self._aggregate_counts[i] += _bin_numeric(aggregate.bins, _statistics(aggregate, matrix))
        for i, cat in enumerate(self.plan.categorical):
            self._bin_category(i, cat, by_tensor.get(cat.tensor))

    def _bin_category(self, i: int, cat: CategoryBins, matrix: np.ndarray | None) -> None:
        if matrix is None or matrix.shape[1] <= cat.column:
            return
        lookup = {c: n for n, c in enumerate(cat.categories)}
        for value in matrix[:, cat.column]:
            key = value if isinstance(value, str) else _category_of(value, cat.categories)
            position = lookup.get(key) if key is not None else None
            if position is None:
                self.counters["violations"]["unknown_category"] += 1
            else:
                self._category_counts[i][position] += 1

    def _bin_outputs(self, pending: Sequence[Mapping[str, np.ndarray]]) -> None:
        ranged = {name: _stack_rows(_values_of(pending, name)) for name in self.plan.output_ranges}
        self._check_output_ranges(ranged)
        for name in self.plan.float_outputs:
            self.counters["violations"]["nan_output"] += _count_nonfinite(pending, name)
        hist = self.plan.output
        if hist is not None:
            self._output_counts += _output_histogram(hist, _values_of(pending, hist.name), self.plan.decision)

    def _check_output_ranges(self, matrices: Mapping[str, np.ndarray | None]) -> None:
        """Count output rows outside their declared range, from [rows, values] matrices by output name."""
        for name, (low, high) in self.plan.output_ranges.items():
            stacked = matrices.get(name)
            if stacked is not None:
                values = stacked.astype(np.float64)
                outside = (values < low) | (values > high)
                self.counters["violations"]["output_out_of_range"] += int(outside.any(axis=1).sum())

    def close(self) -> dict[str, Any]:
        """Bin what is pending and return the window payload (``docs/telemetry.md``)."""
        self.bin_pending()
        features: dict[str, list[int]] = {}
        numeric = [*self.plan.numeric, *(a.bins for a in self.plan.aggregates)]
        for plan, counts in zip(numeric, [*self._numeric_counts, *self._aggregate_counts], strict=True):
            for name, offset, bins in zip(plan.names, plan.offsets, plan.bins, strict=True):
                features[name] = counts[offset : offset + bins].tolist()
        for cat, counts in zip(self.plan.categorical, self._category_counts, strict=True):
            features[cat.name] = counts.tolist()
        payload: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "counters": self.counters,
            "latency_ms": {"counts": self._latency_counts.tolist()},
            "features": features,
            "output": {self.plan.output.name: self._output_counts.tolist()} if self.plan.output else {},
            "shadow": self.shadow,
        }
        if self.llm is not None:
            payload["llm"] = self.llm
        return payload


def _stack_by_tensor(pending: Sequence[Mapping[str, np.ndarray]], keep: Sequence[str]) -> dict[str, np.ndarray]:
    """Concatenate the ``keep`` input tensors of pending requests as [rows, values] per tensor name."""
    if pending and len(pending[0]) == 1:
        name = next(iter(pending[0]))
        arrays = _values_of(pending, name) if name in keep else []
        matrix = _stack_rows(arrays) if len(arrays) == len(pending) else None
        if matrix is not None:
            return {name: matrix}
    grouped: dict[str, list[np.ndarray]] = {}
    for inputs in pending:
        for name, value in inputs.items():
            if name in keep:
                grouped.setdefault(name, []).append(value)
    return {name: matrix for name, arrays in grouped.items() if (matrix := _stack_rows(arrays)) is not None}


def _values_of(mappings: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    """``mapping[name]`` of every mapping that has it (one C-level map when all do, the usual case)."""
    try:
        return list(map(itemgetter(name), mappings))
    except KeyError:
        return [m[name] for m in mappings if name in m]


def _feature_values(plan: TensorBins, matrix: np.ndarray) -> np.ndarray:
    """[rows, features] values of a [rows, values] matrix, in its dtype (a view when every value is a feature)."""
    if plan.all_columns and matrix.shape[1] == len(plan.columns):
        return matrix  # every value is a feature, in order: no gather, no copy
    return matrix[:, plan.columns]


def _stack_rows(arrays: list[Any]) -> np.ndarray | None:
    """[rows, values] from batch-first arrays (one concatenate when shapes agree); None if they cannot stack.

    1-D arrays are batches of scalars (a label per row); 0-D ones are a single row.
    """
    if not arrays:
        return None
    joined = _join_rows(arrays)
    if joined is not None:
        return joined
    try:
        stacked = np.concatenate(arrays, axis=0)
    except ValueError:
        try:
            return np.concatenate([rows_of(a) for a in arrays], axis=0)
        except ValueError:
            return None
    return stacked.reshape(stacked.shape[0], -1)


_DTYPE, _NBYTES = attrgetter("dtype"), attrgetter("nbytes")


def _join_rows(arrays: Sequence[Any]) -> np.ndarray | None:
    """:func:`_stack_rows` of numeric arrays that agree in dtype, size and rows, from their joined bytes.

    One C-level ``bytes.join`` costs ~30 ns per array where ``np.concatenate`` costs ~120: this is most
    of a binning pass. Arrays of one dtype, byte size and row count have the same bytes per row, so the
    joined bytes are the rows in order; anything else (or a non-contiguous array) returns None.
    """
    first = arrays[0]
    if type(first) is not np.ndarray or first.dtype.kind not in "biuf" or first.ndim == 0 or not len(first):
        return None
    if len(set(map(_DTYPE, arrays))) != 1 or len(set(map(_NBYTES, arrays))) != 1 or len(set(map(len, arrays))) != 1:
        return None
    try:
        joined = b"".join(arrays)  # arrays are bytes-like when C-contiguous
    except (TypeError, ValueError, BufferError):
        return None
    return np.frombuffer(joined, first.dtype).reshape(len(first) * len(arrays), -1)


def _statistics(aggregate: AggregateBins, matrix: np.ndarray) -> np.ndarray:
    """[rows, statistics] of a [rows, values] tensor matrix, in the plan's order (NaN rows stay NaN)."""
    values = matrix.astype(np.float64, copy=False)
    return np.column_stack([AGGREGATES[stat](values) for stat in aggregate.stats])


def _rows_out_of_range(plan: TensorBins, values: np.ndarray) -> int:
    """Rows with a feature under its ``min``, over its ``max`` or NaN (two reductions when all are fine)."""
    if plan.common_range is not None:  # one range for all: two whole-array reductions (per-column ones are slow)
        low, high = plan.common_range
        if np.minimum.reduce(values, axis=None) >= low and np.maximum.reduce(values, axis=None) <= high:
            return 0  # a NaN makes min/max NaN, and comparisons with NaN are false (and quiet)
    elif (values >= plan.low).all() and (values <= plan.high).all():
        return 0  # likewise a NaN fails both comparisons
    with np.errstate(invalid="ignore"):
        bad = (values < plan.low) | (values > plan.high) | np.isnan(values)
    return int(bad.any(axis=1).sum())


def _bin_numeric(plan: TensorBins, values: np.ndarray, all_finite: bool | None = None) -> np.ndarray:
    """Counts of every feature's bins (flat, at the plan's offsets) for [rows, features] values.

    ``all_finite`` True: the caller knows there is no NaN (its range check saw none), so the check is skipped.
    Equal-width bins take six passes over one working array made by the first: subtract the first edge,
    scale to bin units (as ``np.histogram`` does for equal-width bins), shift to the feature's place in
    the flat counts, clip to its bins, truncate, count. Passes cost memory bandwidth on wide feature
    sets, so there are no more of them, and float32 values are binned in float32 (three times faster
    than converting them; they hold no more precision than that anyway).
    """
    if all_finite is None:
        all_finite = not np.isnan(np.add.reduce(values, axis=None))  # one pass; a NaN anywhere makes the sum NaN
    finite = None if all_finite else ~np.isnan(values)
    constants = _equal_width_constants(plan, values.dtype)
    if constants is not None:
        first, scale, floor, ceiling = constants
        kept = values if finite is None else np.where(finite, values, first)
        position = np.subtract(kept, first, dtype=first.dtype)
        position *= scale
        position += floor
        np.minimum(position, ceiling, out=position)  # clip to the feature's bins; then truncation is the floor
        np.maximum(position, floor, out=position)
        index = position.astype(np.intp)
    else:
        index = np.minimum((values[:, :, None] >= plan.interior[None, :, :]).sum(axis=2), plan.bins - 1)
        index += plan.offsets
    return np.bincount(index.ravel() if finite is None else index[finite], minlength=plan.total_bins)


def _equal_width_constants(
    plan: TensorBins, dtype: np.dtype[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(first edge, bins per unit, first flat bin, last flat bin) in the working dtype; None for unequal bins."""
    if dtype == np.float32 and plan.float32 is not None:
        return plan.float32
    first, scale, floor, ceiling = plan.first_edge, plan.bins_per_unit, plan.bin_floor, plan.bin_ceiling
    if first is None or scale is None or floor is None or ceiling is None:
        return None
    return first, scale, floor, ceiling


def _output_histogram(hist: Histogram, arrays: list[Any], decision: OutputDecision | None = None) -> np.ndarray:
    """Counts of the outputs ``arrays`` (one per request) on the baseline histogram.

    Batch-1 categorical answers (the usual case) are counted straight from the one-element arrays
    (no concatenation of hundreds of tiny object arrays); scores are stacked, then decided; anything
    else is stacked first.
    """
    if hist.categories and decision is None:
        try:
            return _category_counts(hist, Counter(map(np.ndarray.item, arrays)))  # item(): only 1-element arrays
        except (TypeError, ValueError):
            pass  # not all arrays, or a batch: stack them
    matrix = _stack_rows(arrays)
    return np.zeros(len(hist.freqs), dtype=np.int64) if matrix is None else _scores_histogram(hist, decision, matrix)


def _scores_histogram(hist: Histogram, decision: OutputDecision | None, matrix: np.ndarray) -> np.ndarray:
    """Counts of a [rows, values] output matrix: its decided classes when a decision reads it, else its values."""
    if decision is not None:
        return decision.counts(hist, matrix)
    return _histogram_values(hist, matrix.reshape(-1))


def _category_counts(hist: Histogram, counted: Mapping[Any, int]) -> np.ndarray:
    """Counts of already counted values on a categorical histogram (by label, or by index into the labels)."""
    counts = np.zeros(len(hist.categories), dtype=np.int64)
    for value, n in counted.items():
        position = category_position(value, hist.categories)
        if position >= 0:
            counts[position] += n
    return counts


def category_position(value: Any, categories: tuple[str, ...]) -> int:
    """A value's position among ``categories``: by its text, else as a numeric index; -1 when neither."""
    text = str(value)
    if text in categories:
        return categories.index(text)
    index = _category_of(value, categories)
    return categories.index(index) if index is not None else -1


def _histogram_values(hist: Histogram, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` on a baseline histogram (by label when categorical)."""
    if hist.categories:
        return _category_counts(hist, Counter(values.tolist()))  # few distinct labels: count first, then look up
    numeric = values.astype(np.float64)
    numeric = numeric[~np.isnan(numeric)]
    index = np.searchsorted(np.asarray(hist.edges[1:-1]), numeric, side="right")
    return np.bincount(index, minlength=len(hist.freqs))


def _category_of(value: Any, categories: tuple[str, ...]) -> str | None:
    """A numeric value read as an index into ``categories`` (None when it is not one)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    index = int(number)
    return categories[index] if number == index and 0 <= index < len(categories) else None


def _row_count(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows in a request: the batch dimension of its first input (1 for a 0- or 1-D tensor)."""
    for value in inputs.values():
        shape = value.shape if isinstance(value, np.ndarray) else np.shape(value)
        return int(shape[0]) if len(shape) >= 2 else 1
    return 0


def _rows_not_finite(matrix: np.ndarray) -> int:
    """Rows of a [rows, values] float matrix holding a NaN or an infinity (one pass when all are finite)."""
    if matrix.dtype.kind != "f" or np.isfinite(np.add.reduce(matrix, axis=None)):
        return 0  # a sum is finite only when every value is (inf - inf is NaN)
    return int((~np.isfinite(matrix)).any(axis=1).sum())


def _count_nonfinite(pending: Sequence[Mapping[str, np.ndarray]], name: str) -> int:
    """How many output rows of ``name`` hold a NaN or an infinity (one vectorised pass)."""
    matrix = _stack_rows(_values_of(pending, name))
    return 0 if matrix is None or matrix.size == 0 else _rows_not_finite(matrix)


def merge_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One window holding the sum of ``windows`` (same model and version), spanning all of them.

    Used by the offline buffer to trade time resolution for space; the server merges the same way.
    """
    first = windows[0]
    merged: dict[str, Any] = {"id": uuid.uuid4().hex, "model": first["model"], "version": first["version"]}
    merged["start"] = min(w["start"] for w in windows)  # ISO strings with the same offset sort as times
    merged["end"] = max(w["end"] for w in windows)
    totals = merge_fields(windows)
    merged.update({key: totals.get(key, {}) for key in MERGED_FIELDS})
    return merged
