"""Pure functions over metric-window payloads: merge by addition, percentiles, PSI.

Windows are sums and counts (``docs/telemetry.md``), so any set of them (one device over a day,
a cohort over an hour, the whole fleet) merges into one window by adding element-wise. Latency
percentiles come from the merged log-spaced histogram; PSI compares a merged histogram with the
bundle's baseline frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bundles.windows import LATENCY_EDGES_MS, merge_valid

PSI_EPSILON = 1e-4
"""Floor for empty bins so that PSI stays finite (a common convention)."""


def merge_windows(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add window payloads into one: counters, latency, features, output, shadow (the shared rule); a
    payload that breaks the window contract is left out (``bundles.windows.merge_valid``)."""
    return merge_valid(payloads)[0]


def add_nested(left: Any, right: Any) -> Any:
    """Element-wise sum of two nested structures of numbers, lists and dicts (``None`` is zero)."""
    if left is None:
        return _copy(right)
    if isinstance(right, Mapping) and isinstance(left, Mapping):
        out = dict(left)
        for key, value in right.items():
            out[key] = add_nested(out.get(key), value)
        return out
    if isinstance(right, list) and isinstance(left, list):
        longer, shorter = (left, right) if len(left) >= len(right) else (right, left)
        return [add_nested(a, shorter[i] if i < len(shorter) else None) for i, a in enumerate(longer)]
    if isinstance(right, (int, float)) and isinstance(left, (int, float)):
        return left + right
    return left if right is None else right


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def latency_percentile(
    counts: Sequence[float], quantile: float, edges: Sequence[float] = LATENCY_EDGES_MS
) -> float | None:
    """The ``quantile`` (0..1) of a histogram on ``edges`` (default :data:`LATENCY_EDGES_MS`), or None if empty.

    Interpolates log-linearly inside the bucket that holds the quantile; the open-ended first and
    last buckets answer their finite edge. Also reads the TTFT and tokens/s histograms of language
    models (``bundles.windows.TOKENS_PER_S_EDGES``).
    """
    total = float(sum(counts))
    if total <= 0:
        return None
    target = quantile * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count > 0 and seen + count >= target:
            return _interpolate_bucket(i, (target - seen) / count, edges)
        seen += count
    return edges[-1]


def _interpolate_bucket(index: int, fraction: float, edges: Sequence[float]) -> float:
    if index == 0:
        return edges[0]
    if index >= len(edges):
        return edges[-1]
    low, high = math.log10(edges[index - 1]), math.log10(edges[index])
    return float(10 ** (low + (high - low) * max(0.0, min(1.0, fraction))))


def psi(observed_counts: Sequence[float], expected_freqs: Sequence[float]) -> float | None:
    """Population stability index of observed counts against baseline frequencies.

    ``sum((o - e) * ln(o / e))`` over bins, with both sides floored at :data:`PSI_EPSILON`. None
    when nothing was observed or the bins do not line up.
    """
    total = float(sum(observed_counts))
    if total <= 0 or len(observed_counts) != len(expected_freqs):
        return None
    value = 0.0
    for count, expected in zip(observed_counts, expected_freqs, strict=True):
        o = max(count / total, PSI_EPSILON)
        e = max(float(expected), PSI_EPSILON)
        value += (o - e) * math.log(o / e)
    return value


def psi_by_feature(merged: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """PSI per input feature and per output (``output:<name>``) against a manifest's drift baseline."""
    out: dict[str, float] = {}
    features = merged.get("features") or {}
    for hist in baseline.get("features") or []:
        value = psi(features.get(hist["name"], []), hist.get("freqs", []))
        if value is not None:
            out[hist["name"]] = value
    output_hist = baseline.get("output")
    if output_hist:
        counts = (merged.get("output") or {}).get(output_hist["name"], [])
        value = psi(counts, output_hist.get("freqs", []))
        if value is not None:
            out[f"output:{output_hist['name']}"] = value
    return out


def counter(merged: Mapping[str, Any], *path: str) -> int:
    """A counter from a merged window (``counter(m, "sources", "cloud")``), 0 when absent."""
    node: Any = merged.get("counters") or {}
    for key in path:
        node = node.get(key, 0) if isinstance(node, Mapping) else 0
    return int(node) if isinstance(node, (int, float)) else 0
