"""Sampled prediction logs with provenance: which requests are kept, and with what probability.

Two streams per window, each bounded by its own reservoir (Algorithm R) so that disk use does not
grow with traffic:

- routine: every request is a candidate with probability ``sample_rate``, independently (a Bernoulli
  trial); the candidates go through a reservoir of ``reservoir_size``. A kept sample's inclusion
  probability is ``sample_rate * min(1, reservoir_size / candidates)``. The trials are not drawn one
  by one: the gap to the next candidate is drawn from the geometric distribution of the gaps between
  successes of Bernoulli(``sample_rate``) trials, and a countdown decrements per request
  (:meth:`WindowSampler.draw`). That is the same process (each request still a candidate with
  probability exactly ``sample_rate``, independently) for one random draw per candidate instead of
  one per request.
- forced: errors, fallbacks and low-confidence answers are always candidates, bounded by a
  reservoir of ``max_forced_per_window``; inclusion probability ``min(1, max / forced)``.

Inclusion probabilities are only known when the window closes (the reservoir's final size), so
samples are finalised then (:meth:`WindowSampler.close`), with redaction and JSON encoding done for
the few kept records only.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.manifest import Manifest

MAX_LOGGED_VALUES = 65_536
"""Tensors of more values are logged without their data (dtype, shape and a summary only): a sample
stays well under the server's 4 MiB body limit and does not crowd the offline buffer."""
FORCED_REASONS = ("error", "fallback", "low_confidence")
CAPTURE_REASONS = ("rate", *FORCED_REASONS)


@dataclass
class Candidate:
    """One request kept in a reservoir until the window closes.

    ``at_s`` is epoch seconds, formatted when the window closes: formatting a timestamp costs a sampled
    request some 20 us where it runs (cold), and most candidates are replaced before their window closes.
    """

    at_s: float
    model: str
    version: int
    reason: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    source: str | None
    latency_ms: float
    fallback_reason: str | None
    error: str | None
    confidence: float | None


class Reservoir:
    """Algorithm R: a uniform sample of at most ``size`` of everything offered."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.seen = 0
        self.items: list[Candidate] = []

    def wants_next(self) -> int | None:
        """Count one more candidate; the slot it would take, or None if it is not kept."""
        self.seen += 1
        if len(self.items) < self.size:
            return len(self.items)
        slot = int(self.rng.random() * self.seen)  # uniform in [0, seen) to 2**-53; a tenth of randrange
        return slot if slot < self.size else None

    def put(self, slot: int, item: Candidate) -> None:
        if slot == len(self.items):
            self.items.append(item)
        else:
            self.items[slot] = item

    def fraction_kept(self) -> float:
        """The probability that a given candidate survived: ``min(1, size / seen)``."""
        return 1.0 if self.seen <= self.size else self.size / self.seen


class WindowSampler:
    """The samples of one (model, version) window; see the module docstring."""

    __slots__ = ("sample_rate", "rng", "routine", "forced", "countdown", "_log_miss", "max_values")

    def __init__(
        self,
        sample_rate: float,
        reservoir_size: int,
        max_forced: int,
        rng: random.Random,
        max_values: int = MAX_LOGGED_VALUES,
    ) -> None:
        self.sample_rate = sample_rate
        self.max_values = max_values
        self.rng = rng
        self._log_miss = math.log1p(-sample_rate) if 0.0 < sample_rate < 1.0 else 0.0
        self.routine = Reservoir(reservoir_size, rng)
        self.forced = Reservoir(max_forced, rng)
        self.countdown = self.gap()  # routine requests until the next candidate, included (the fast path decrements)

    def gap(self) -> int:
        """Trials up to and including the next success of Bernoulli(``sample_rate``): geometric, >= 1.

        ``P(gap = k) = (1 - p) ** (k - 1) * p``, by inversion: ``floor(log(U) / log(1 - p)) + 1`` with U
        uniform in (0, 1]. A rate of 0 never samples (the countdown does not reach 0 in 2**63 requests).
        """
        p = self.sample_rate
        if p >= 1.0:
            return 1
        if p <= 0.0:
            return sys.maxsize
        return int(math.log(1.0 - self.rng.random()) / self._log_miss) + 1

    def draw(self) -> bool:
        """One routine request's Bernoulli(``sample_rate``) trial: whether it is a candidate."""
        self.countdown -= 1
        if self.countdown > 0:
            return False
        self.countdown = self.gap()
        return True

    def slot_for(self, forced_reason: str | None, drawn: bool = False) -> tuple[Reservoir, int] | None:
        """Decide, cheaply, whether this request is kept; the reservoir and slot if so.

        ``drawn`` says the caller already won the Bernoulli trial (:meth:`draw`) for a routine request.
        """
        if forced_reason is not None:
            slot = self.forced.wants_next()
            return None if slot is None else (self.forced, slot)
        if not drawn and not self.draw():
            return None
        slot = self.routine.wants_next()
        return None if slot is None else (self.routine, slot)

    def close(self, manifest: Manifest | None) -> list[dict[str, Any]]:
        """The kept samples as JSON-ready dicts with their inclusion probability, redacted."""
        redaction = sensitive_positions(manifest)
        routine_p, forced_p = self.sample_rate * self.routine.fraction_kept(), self.forced.fraction_kept()
        out = [sample_record(c, routine_p, redaction, self.max_values) for c in self.routine.items]
        out += [sample_record(c, forced_p, redaction, self.max_values) for c in self.forced.items]
        return out


def sensitive_positions(manifest: Manifest | None) -> dict[str, list[tuple[str, int]]]:
    """Per input tensor, the (feature name, flat index) of each feature declared sensitive."""
    positions: dict[str, list[tuple[str, int]]] = {}
    if manifest is None:
        return positions
    default = manifest.inputs[0].name
    for feature in manifest.features:
        if feature.sensitive:
            positions.setdefault(feature.tensor or default, []).append((feature.name, feature.index))
    return positions


def sample_record(
    candidate: Candidate,
    inclusion_probability: float,
    redaction: Mapping[str, list[tuple[str, int]]],
    max_values: int = MAX_LOGGED_VALUES,
) -> dict[str, Any]:
    """One sample as ``docs/telemetry.md`` defines it."""
    inputs, redacted = redact(candidate.inputs, redaction, max_values)
    return {
        "id": uuid.uuid4().hex,
        "at": dt.datetime.fromtimestamp(candidate.at_s, dt.timezone.utc).isoformat(),
        "model": candidate.model,
        "version": candidate.version,
        "source": candidate.source,
        "capture_reason": candidate.reason,
        "inclusion_probability": inclusion_probability,
        "inputs": inputs,
        "outputs": {k: encode_for_log(v, max_values) for k, v in candidate.outputs.items()},
        "redacted": redacted,
        "latency_ms": round(candidate.latency_ms, 4),
        "fallback_reason": candidate.fallback_reason,
        "error": candidate.error,
        "confidence": candidate.confidence,
    }


def redact(
    inputs: Mapping[str, np.ndarray],
    redaction: Mapping[str, list[tuple[str, int]]],
    max_values: int = MAX_LOGGED_VALUES,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Encode inputs, blanking (``null``) every sensitive feature in every row; names redacted.

    A tensor logged without its data (over ``max_values``) has no summary if it holds a sensitive feature.
    """
    encoded: dict[str, dict[str, Any]] = {}
    redacted: list[str] = []
    for name, value in inputs.items():
        tensor = encode_for_log(value, max_values)
        positions = redaction.get(name, [])
        if positions:
            _blank(tensor, positions)
            redacted += [feature for feature, _ in positions]
        encoded[name] = tensor
    return encoded, sorted(set(redacted))


def _blank(tensor: dict[str, Any], positions: list[tuple[str, int]]) -> None:
    if tensor["data"] is None:
        tensor.pop("summary", None)  # a summary could leak the sensitive values
        return
    shape = tensor["shape"]
    data: list[Any] = tensor["data"]
    rows = shape[0] if len(shape) >= 2 else 1
    width = len(data) // rows if rows else 0
    for row in range(rows):
        for _, index in positions:
            if index < width:
                data[row * width + index] = None


def encode_for_log(value: Any, max_values: int = MAX_LOGGED_VALUES) -> dict[str, Any]:
    """A tensor as ``{"dtype", "shape", "data"}``; non-finite floats become ``null`` (JSON has none).

    Over ``max_values`` values the data is left out (``"data": null, "truncated": true``) and numeric
    tensors get ``"summary": {"min", "max", "mean"}`` of their finite values instead.
    """
    arr = np.asarray(value)
    if arr.size > max_values:
        return _truncated(arr)
    if arr.dtype.kind in "USO":
        data: list[Any] = [str(v) for v in arr.reshape(-1)]
        dtype = "string"
    else:
        data = arr.reshape(-1).tolist()
        dtype = str(arr.dtype.name)
        if arr.dtype.kind == "f" and arr.dtype.itemsize <= 4:
            data = [float(f"{v:.9g}") for v in data]  # 9 significant digits round-trip float32 exactly
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            data = [v if isinstance(v, (int, float)) and np.isfinite(v) else None for v in data]
    return {"dtype": dtype, "shape": [int(d) for d in arr.shape], "data": data}


def _truncated(arr: np.ndarray) -> dict[str, Any]:
    """A tensor too big to log: its dtype, shape and, when numeric, a summary of its finite values."""
    out: dict[str, Any] = {"dtype": "string" if arr.dtype.kind in "USO" else str(arr.dtype.name)}
    out.update(shape=[int(d) for d in arr.shape], data=None, truncated=True)
    if arr.dtype.kind in "biuf":
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        stats = (float(finite.min()), float(finite.max()), float(finite.mean())) if finite.size else (None, None, None)
        out["summary"] = dict(zip(("min", "max", "mean"), stats, strict=True))
    return out
