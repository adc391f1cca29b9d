"""How much one device may weigh in a gate: no more than twice the median device of its cohort.

A gate reads the sum of the windows of a cohort's devices (a wave, one variant of it, or the
control cohort). Pooled counts weigh each device by what it claims, and a window may claim up to
10^12 requests: one device sending a window of 10^12 clean requests made a wave at 30 % errors read
``error_rate=6e-11`` (ADR 0015). So, per cohort and per kind of sample (requests, shadow comparisons,
generations), the **cap** is :data:`CAP_TIMES_MEDIAN` times the median of the devices that reported
any sample of that kind (the lower median: with two devices, the smaller one). A device whose count
is over the cap counts at weight ``cap / count`` (the smallest over the kinds it exceeds), applied to
everything it sent (requests, errors, fallbacks, latency and feature histograms, shadow and LLM
figures): it weighs as much as a device at the cap, and its own rates and distributions are kept.
Every other device counts in full, so a cohort of devices with similar traffic reads exactly the pooled
sums it always did.

The lower median moves only if half the reporting devices move it, so one device, or any minority,
can add at most twice a typical device's weight to what the others report. A device that honestly
carries most of a wave's traffic is counted as twice the median device too: its figures are still in
the gate, beside the others', no longer deciding it alone.

The weighted sums are computed from the cohort's rollup and the shares of the capped devices only
(``rollout_device_sums``, kept by :mod:`.fold`): the rollup minus their full shares (exactly, in
integers), plus their shares times their weights, so an evaluation reads one narrow row per device
and the JSON of the few devices over the cap.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Select, Text, cast, func, or_, select
from sqlalchemy.orm import Session

from bundles import jsonio
from bundles.windows import PartsShape, merge_fields, merge_window_parts, sum_nested
from fleet_server.db import among
from fleet_server.rollouts.models import RolloutDevice, RolloutDeviceSum

CAP_TIMES_MEDIAN = 2.0
"""A device counts for at most this many times the median device of its cohort, in each kind of sample."""
SAMPLE_KINDS = ("requests", "shadow_samples", "generations")

_Query = TypeVar("_Query", bound=Select)  # type: ignore[type-arg]
ShareKey = tuple[int, int, str, int]  # rollout id, wave index, cohort, bundle version (a rollup's key)


@dataclass(frozen=True)
class Bound:
    """The caps of a cohort (per kind of sample; None: no device reported that kind) and the weight of each device
    over a cap (the others weigh 1)."""

    caps: dict[str, float | None] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def bound_of(session: Session, key: ShareKey, variant: str | None = None) -> Bound:
    """The caps and weights of a cohort's devices (only those directed to ``variant``, when given), as :func:`bound`
    gives them. On PostgreSQL the medians are computed in the database and only the rows of the devices over a cap
    are read (a cohort has thousands of rows; a tick evaluates two or more cohorts)."""
    table = RolloutDeviceSum
    counts = (table.requests, table.shadow_samples, table.generations)
    connection = session.connection()
    if session.get_bind().dialect.name != "postgresql":
        return bound([tuple(row) for row in connection.execute(_of_cohort(select(table.device_id, *counts), key,
                                                                           variant))])  # fmt: skip
    medians = [func.percentile_disc(0.5).within_group(column).filter(column > 0) for column in counts]
    found = connection.execute(_of_cohort(select(*medians), key, variant)).one()  # the lower median, as median_low
    caps = {kind: CAP_TIMES_MEDIAN * float(median) if median else None
            for kind, median in zip(SAMPLE_KINDS, found, strict=True)}  # fmt: skip
    over = [column > cap for column, cap in zip(counts, caps.values(), strict=True) if cap is not None]
    if not over:
        return Bound(caps, {})
    query = _of_cohort(select(table.device_id, *counts), key, variant).where(or_(*over))
    return Bound(caps, _weights([tuple(row) for row in connection.execute(query)], caps))


def _of_cohort(query: _Query, key: ShareKey, variant: str | None) -> _Query:
    table = RolloutDeviceSum
    query = query.where(table.rollout_id == key[0], table.wave_index == key[1], table.cohort == key[2],
                        table.bundle_version == key[3])  # fmt: skip
    if variant is not None:
        query = query.join(
            RolloutDevice, (RolloutDevice.rollout_id == table.rollout_id) & (RolloutDevice.device_id == table.device_id)
        ).where(RolloutDevice.variant == variant)
    return query  # fmt: skip


def bound(shares: Sequence[Sequence[Any]]) -> Bound:
    """The caps and the weights of the devices over them (``shares``: ``(device_id, requests, shadow_samples,
    generations)`` rows, every device of the cohort)."""
    caps: dict[str, float | None] = {}
    for column, kind in enumerate(SAMPLE_KINDS, start=1):
        reported = [float(share[column]) for share in shares if share[column] > 0]
        caps[kind] = CAP_TIMES_MEDIAN * statistics.median_low(reported) if reported else None
    return Bound(caps, _weights(shares, caps))


def _weights(shares: Sequence[Sequence[Any]], caps: Mapping[str, float | None]) -> dict[str, float]:
    """Each device over a cap: ``cap / count``, the smallest over the kinds of sample it exceeds."""
    weights: dict[str, float] = {}
    for share in shares:
        over = [cap / share[column] for column, kind in enumerate(SAMPLE_KINDS, start=1)
                if (cap := caps[kind]) is not None and share[column] > cap]  # fmt: skip
        if over:
            weights[share[0]] = min(over)
    return weights


def bounded(session: Session, key: ShareKey, merged: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, Any]:
    """The cohort's rollup ``merged`` with each device of ``weights`` counted at its weight instead of in full."""
    if not weights:
        return dict(merged)
    table = RolloutDeviceSum
    query = select(table.device_id, cast(table.merged, Text)).where(
        table.rollout_id == key[0], table.wave_index == key[1], table.cohort == key[2], table.bundle_version == key[3],
        among(table.device_id, list(weights)))  # fmt: skip
    shares = {row[0]: share_window(_parsed(row[1])) for row in session.connection().execute(query)}
    rest = merge_fields([merged, *(scaled(share, -1) for share in shares.values())])  # exact: integers stay integers
    total: dict[str, Any] = clamped(merge_fields([rest, *(scaled(s, weights[d]) for d, s in shares.items())]))
    return total


def added_share(stored: Mapping[str, Any] | None, parts: Sequence[tuple[PartsShape, list[int], list[float]]],
                others: Sequence[Mapping[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """A device's share (``rollout_device_sums.merged``) with windows added: ``parts``, taken apart by
    :func:`bundles.windows.window_parts`, and ``others`` (windows of no usual shape).

    A share keeps its usual windows as column sums per shape (``{"parts": {shape as JSON: [counts, sums]}}``,
    plus ``"others"``, the other windows merged), so that adding a window is a sum of two lists, not a walk of
    its fields: the fold adds one to each device that reported, every tick.
    """
    by_shape: dict[str, list[list[Any]]] = dict((stored or {}).get("parts") or {})
    for shape, counts, sums in parts:
        name = _shape_name(shape)
        before = by_shape.get(name)
        if before is None or len(before[0]) != len(counts) or len(before[1]) != len(sums):
            by_shape[name] = [list(counts), list(sums)] if before is None else _merged_parts(before, counts, sums)
        else:
            by_shape[name] = [
                [a + b for a, b in zip(before[0], counts, strict=True)],
                [a + b for a, b in zip(before[1], sums, strict=True)],
            ]
    out: dict[str, Any] = {"parts": by_shape}
    rest = [(stored or {}).get("others"), *others]
    if any(rest):
        out["others"] = merge_fields([r for r in rest if r])
    return out


def share_window(share: Mapping[str, Any]) -> dict[str, Any]:
    """A share (:func:`added_share`) as the one window its windows add up to."""
    parts = []
    for name, value in (share.get("parts") or {}).items():
        if isinstance(value, list) and len(value) == 2:
            parts.append((_tupled(json.loads(name)), value[0], value[1]))
    others = [share["others"]] if isinstance(share.get("others"), Mapping) else []
    return merge_window_parts(parts, others) if parts or others else {}


@functools.lru_cache(maxsize=256)
def _shape_name(shape: PartsShape) -> str:
    return json.dumps(shape, separators=(",", ":"))


def _tupled(value: Any) -> Any:
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value


def _merged_parts(before: list[list[Any]], counts: list[int], sums: list[float]) -> list[list[Any]]:
    """Lists of one shape that do not line up (a share written by hand): added element-wise, padded."""
    return [sum_nested([before[0], counts]) or [], sum_nested([before[1], sums]) or []]


def scaled(value: Any, factor: float) -> Any:
    """Every number of a nested window (dicts, lists) times ``factor``; anything else as it is."""
    if isinstance(value, Mapping):
        return {key: scaled(item, factor) for key, item in value.items()}
    if isinstance(value, list):
        return [scaled(item, factor) for item in value]
    if type(value) in (int, float):
        return value * factor
    return value


def clamped(value: Any) -> Any:
    """Negative numbers (a float sum a rounding error under zero) as 0."""
    if isinstance(value, Mapping):
        return {key: clamped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clamped(item) for item in value]
    if type(value) in (int, float) and value < 0:
        return 0.0
    return value


def weighted_counts(merged: Mapping[str, Any]) -> dict[str, Any]:
    """The counts of a weighted sum as fractions (:func:`fleet_server.telemetry.aggregate.counter` truncates them to
    integers): requests, errors, fallbacks, shadow comparisons and agreement, generations."""
    counters, shadow, llm = (merged.get(name) or {} for name in ("counters", "shadow", "llm"))
    compared = _number(shadow, "compared")
    return {"requests": _number(counters, "requests"), "errors": _number(counters, "errors"),
            "fallbacks": _number(counters, "fallbacks"), "shadow_samples": compared,
            "shadow_agreement": _number(shadow, "agreed") / compared if compared else None,
            "generations": _number(llm, "generations")}  # fmt: skip


def samples_of(window: Mapping[str, Any]) -> tuple[float, float, float]:
    """A window's sample counts, what a device's weight depends on (:data:`SAMPLE_KINDS`: requests, shadow
    comparisons, generations); read for every window the fold adds, so without :func:`weighted_counts`' dict."""
    get = window.get
    return _number(get("counters"), "requests"), _number(get("shadow"), "compared"), _number(get("llm"), "generations")


def _number(node: Any, key: str) -> float:
    value = node.get(key, 0) if isinstance(node, Mapping) else 0
    return float(value) if type(value) in (int, float) else 0.0


def _parsed(text: Any) -> dict[str, Any]:
    try:
        value = jsonio.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


__all__ = [
    "CAP_TIMES_MEDIAN",
    "SAMPLE_KINDS",
    "Bound",
    "added_share",
    "bound",
    "bound_of",
    "bounded",
    "samples_of",
    "scaled",
    "share_window",
    "weighted_counts",
]
