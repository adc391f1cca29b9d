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

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from bundles import jsonio
from bundles.windows import merge_fields
from fleet_server.db import among
from fleet_server.rollouts.models import RolloutDevice, RolloutDeviceSum

CAP_TIMES_MEDIAN = 2.0
"""A device counts for at most this many times the median device of its cohort, in each kind of sample."""
SAMPLE_KINDS = ("requests", "shadow_samples", "generations")

ShareKey = tuple[int, int, str, int]  # rollout id, wave index, cohort, bundle version (a rollup's key)


@dataclass(frozen=True)
class Bound:
    """The caps of a cohort (per kind of sample; None: no device reported that kind) and the weight of each device
    over a cap (the others weigh 1)."""

    caps: dict[str, float | None] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def shares_of(session: Session, key: ShareKey, variant: str | None = None) -> list[tuple[Any, ...]]:
    """The cohort's devices' sample counts: ``(device_id, requests, shadow_samples, generations)`` rows (only the
    devices directed to ``variant``, when given)."""
    table = RolloutDeviceSum
    query = select(table.device_id, table.requests, table.shadow_samples, table.generations).where(
        table.rollout_id == key[0], table.wave_index == key[1], table.cohort == key[2], table.bundle_version == key[3]
    )
    if variant is not None:
        query = query.join(
            RolloutDevice, (RolloutDevice.rollout_id == table.rollout_id) & (RolloutDevice.device_id == table.device_id)
        ).where(RolloutDevice.variant == variant)
    return [tuple(row) for row in session.connection().execute(query)]  # fmt: skip


def bound(shares: Sequence[Sequence[Any]]) -> Bound:
    """The caps and the weights of the devices over them (``shares``: rows of :func:`shares_of`)."""
    caps: dict[str, float | None] = {}
    for column, kind in enumerate(SAMPLE_KINDS, start=1):
        reported = [float(share[column]) for share in shares if share[column] > 0]
        caps[kind] = CAP_TIMES_MEDIAN * statistics.median_low(reported) if reported else None
    weights: dict[str, float] = {}
    for share in shares:
        over = [cap / share[column] for column, kind in enumerate(SAMPLE_KINDS, start=1)
                if (cap := caps[kind]) is not None and share[column] > cap]  # fmt: skip
        if over:
            weights[share[0]] = min(over)
    return Bound(caps, weights)


def bounded(session: Session, key: ShareKey, merged: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, Any]:
    """The cohort's rollup ``merged`` with each device of ``weights`` counted at its weight instead of in full."""
    if not weights:
        return dict(merged)
    table = RolloutDeviceSum
    query = select(table.device_id, cast(table.merged, Text)).where(
        table.rollout_id == key[0], table.wave_index == key[1], table.cohort == key[2], table.bundle_version == key[3],
        among(table.device_id, list(weights)))  # fmt: skip
    shares = {row[0]: _parsed(row[1]) for row in session.connection().execute(query)}
    rest = merge_fields([merged, *(scaled(share, -1) for share in shares.values())])  # exact: integers stay integers
    total: dict[str, Any] = clamped(merge_fields([rest, *(scaled(s, weights[d]) for d, s in shares.items())]))
    return total


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


def samples_of(merged: Mapping[str, Any]) -> dict[str, float]:
    """A device's share's sample counts (what its weight depends on): requests, shadow comparisons, generations."""
    counts = weighted_counts(merged)
    return {kind: counts[kind] for kind in SAMPLE_KINDS}


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
    "bound",
    "bounded",
    "samples_of",
    "scaled",
    "shares_of",
    "weighted_counts",
]
