"""The metric-window contract shared by the device (which writes windows) and the server (which adds them).

A metric window is sums and counts only (``docs/telemetry.md``): counters, a latency histogram on
the fixed :data:`LATENCY_EDGES_MS`, per-feature histograms on the bundle's baseline bins, the output
distribution and shadow agreement. Any set of windows therefore merges into one by adding
element-wise, which is what the device's offline buffer does to save space and what the server does
to sum a device over a day or a cohort over an hour. Both sides use these functions so that the two
can never disagree on the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

LATENCY_EDGES_MS: tuple[float, ...] = tuple(10 ** (k / 10) for k in range(-20, 51))
"""Latency bucket edges in ms: 0.01 ms to 100 s, ten per decade (71 edges, 72 buckets)."""

MERGED_FIELDS = ("counters", "latency_ms", "features", "output", "shadow")
"""The fields of a window payload that add up; the rest (ids, times) describe it."""


def merge_fields(payloads: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The element-wise sum of the :data:`MERGED_FIELDS` of ``payloads`` (fields absent everywhere are left out)."""
    windows = list(payloads)
    merged: dict[str, Any] = {}
    for key in MERGED_FIELDS:
        total = sum_nested([w.get(key) for w in windows])
        if total is not None:
            merged[key] = total
    return merged


def sum_nested(values: list[Any]) -> Any:
    """Element-wise sum of many nested dicts / lists of numbers in one walk.

    ``None`` counts as zero; shorter lists are padded with zeros; lists are summed with numpy (int
    lists stay ints). A value that is not a number (a label) keeps its last occurrence.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, Mapping):
        keys = dict.fromkeys(k for v in present if isinstance(v, Mapping) for k in v)
        return {k: sum_nested([v.get(k) for v in present if isinstance(v, Mapping)]) for k in keys}
    if isinstance(first, list):
        return _sum_lists([v for v in present if isinstance(v, list)])
    numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) if numbers else present[-1]


def _sum_lists(rows: list[list[Any]]) -> Any:
    width = max(len(r) for r in rows)
    if any(len(r) != width for r in rows):
        rows = [r + [0] * (width - len(r)) for r in rows]
    try:
        return np.asarray(rows).sum(axis=0).tolist()
    except (TypeError, ValueError):  # not numbers: keep the newest
        return rows[-1]


__all__ = ["LATENCY_EDGES_MS", "MERGED_FIELDS", "merge_fields", "sum_nested"]
