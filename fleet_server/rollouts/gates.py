"""Gates: parsed from strings such as ``error_rate<0.01``, evaluated on what a wave's devices report.

A gate is ``<metric> <op> <threshold>[x] [min=<n>] [per=variant]``. A threshold ending in ``x`` is
relative to the devices still on the previous version (the control cohort): ``p99_ms<1.2x`` passes
while the wave's p99 is under 1.2 times the control's. ``min=`` overrides the metric's minimum sample
size. ``per=variant`` judges each variant's devices on their own (a bundle's TFLite variant on some
boards, its ONNX variant on others): the gate fails when any variant's cohort fails it, waits while
any waits, and passes when every one passes (:func:`evaluate_per_variant`), so a bad variant cannot
hide behind a healthy majority.

Each evaluation has three outcomes: ``pass``, ``fail``, or ``wait`` (not enough data yet: fewer
samples than the minimum, no control figure for a relative gate). Insufficient data never passes.
``install_success`` counts a device as a success only once it has run the new bundle healthily through
the soak (see :mod:`.decisions`); failed installs and silent devices (timed out) count against it, and
it fails early as soon as the threshold is out of reach even if every remaining device succeeds.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from bundles.errors import ConfigError

_GATE_RE = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op><=|>=|<|>)\s*(?P<value>\d+(?:\.\d+)?(?:e-?\d+)?)\s*(?P<rel>x)?"
    r"\s*(?:(?:min|min_samples)\s*=\s*(?P<min>\d+))?\s*(?:per\s*=\s*(?P<per>variant))?\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Metric:
    """A gate metric: which sample size guards it and whether a control comparison makes sense."""

    name: str
    sample: str  # "requests", "shadow_samples", "generations" or "devices"
    default_min: int
    relative_ok: bool
    meaning: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("error_rate", "requests", 100, True, "errors / requests on the new bundle"),
        Metric("fallback_rate", "requests", 100, True, "cloud fallbacks / requests"),
        Metric("p95_ms", "requests", 100, True, "95th percentile local inference latency, ms"),
        Metric("p99_ms", "requests", 200, True, "99th percentile local inference latency, ms"),
        Metric("psi", "requests", 200, False, "largest input-feature PSI against the bundle's baseline"),
        Metric("psi_output", "requests", 200, False, "output PSI against the bundle's baseline"),
        Metric("shadow_agreement", "shadow_samples", 100, False, "share of shadow predictions equal to the active's"),
        Metric("ttft_p95_ms", "generations", 50, True, "language models: 95th percentile time to first token, ms"),
        Metric("tokens_per_s_p50", "generations", 50, True, "language models: median decode speed, tokens/s"),
        Metric("install_success", "devices", 0, False, "devices healthy after the soak / devices settled"),
    )
}


@dataclass(frozen=True)
class Gate:
    """One parsed gate."""

    metric: str
    op: str
    threshold: float
    relative: bool = False
    min_samples: int | None = None
    per_variant: bool = False

    @classmethod
    def parse(cls, text: str) -> Gate:
        """Parse ``error_rate<0.01``, ``p99_ms<1.2x``, ``psi<0.2 min=500``; ConfigError if malformed."""
        match = _GATE_RE.match(text)
        if not match:
            raise ConfigError(f"gate {text!r} is not METRIC<VALUE (e.g. error_rate<0.01, p99_ms<40, psi<0.2 min=500)")
        metric = match.group("metric")
        if metric not in METRICS:
            raise ConfigError(f"gate {text!r}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
        relative = bool(match.group("rel"))
        if relative and not METRICS[metric].relative_ok:
            raise ConfigError(f"gate {text!r}: {metric} has no previous-version comparison; give an absolute value")
        minimum = int(match.group("min")) if match.group("min") else None
        return cls(metric, match.group("op"), float(match.group("value")), relative, minimum, bool(match.group("per")))

    @property
    def text(self) -> str:
        """The gate as an operator writes it (stable: used as its key in stored evaluations)."""
        value = f"{self.threshold:g}{'x' if self.relative else ''}"
        text = f"{self.metric}{self.op}{value}" + (f" min={self.min_samples}" if self.min_samples is not None else "")
        return text + (" per=variant" if self.per_variant else "")


def parse_gates(texts: tuple[str, ...] | list[str]) -> tuple[Gate, ...]:
    """Parse every gate; an ``install_success>=0.95`` gate is added when none is given."""
    gates = tuple(Gate.parse(t) for t in texts)
    if not any(g.metric == "install_success" for g in gates):
        gates += (Gate("install_success", ">=", 0.95),)
    return gates


@dataclass(frozen=True)
class CohortFigures:
    """What a cohort reported, plus the wave's device outcomes (absent telemetry stays None)."""

    devices_total: int = 0
    devices_healthy: int = 0
    devices_failed: int = 0
    devices_timed_out: int = 0
    devices_reporting: int = 0
    requests: float = 0  # an integer, unless some devices were counted at a bounded weight
    errors: float = 0
    fallbacks: float = 0
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    psi_max_input: float | None = None
    psi_output: float | None = None
    shadow_agreement: float | None = None
    shadow_samples: float = 0
    invalid_windows: int = 0  # stored windows left out of the figures: they broke the window contract
    generations: float = 0
    ttft_p95_ms: float | None = None
    tokens_per_s_p50: float | None = None
    bounded_devices: int = 0
    """Devices counted at a weight under 1: they claimed more than twice the median device (``.weights``); the
    counts above are then weighted sums, fractions."""
    request_cap: float | None = None  # the most requests one device counts for (twice the median device's)

    @classmethod
    def from_stats(cls, stats: Any, **outcomes: int) -> CohortFigures:
        """From a telemetry ``CohortStats`` (read by attribute name) and device outcome counts."""
        names = [f for f in cls.__dataclass_fields__ if not f.startswith("devices_") or f == "devices_reporting"]
        values = {n: getattr(stats, n) for n in names if stats is not None and hasattr(stats, n)}
        return cls(**values, **outcomes)

    @property
    def devices_settled(self) -> int:
        """Devices with a final outcome: healthy after the soak, failed, or timed out."""
        return self.devices_healthy + self.devices_failed + self.devices_timed_out

    def value(self, metric: str) -> float | None:
        """The metric's value, None when there is nothing to compute it from."""
        rate = {"error_rate": self.errors, "fallback_rate": self.fallbacks}
        if metric in rate:
            return rate[metric] / self.requests if self.requests else None
        if metric == "install_success":
            return self.devices_healthy / self.devices_settled if self.devices_settled else None
        direct = {"p95_ms": self.latency_p95_ms, "p99_ms": self.latency_p99_ms, "psi": self.psi_max_input}
        if metric in direct:
            return direct[metric]
        return getattr(self, metric, None)  # type: ignore[no-any-return]

    def sample(self, kind: str) -> float:
        """The sample size of a kind: requests, shadow samples or settled devices."""
        samples = {"requests": self.requests, "shadow_samples": self.shadow_samples, "generations": self.generations}
        return samples.get(kind, self.devices_settled)


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict with the numbers behind it (stored in evaluations and decision records)."""

    gate: str
    metric: str
    status: str  # "pass" | "fail" | "wait"
    value: float | None
    threshold: float | None
    sample: float
    min_samples: int
    control_value: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form (persisted keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateResult:
        """Back from :meth:`to_dict`."""
        values: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**values)


def evaluate_gate(gate: Gate, canary: CohortFigures, control: CohortFigures | None = None) -> GateResult:
    """Pass, fail or wait for one gate on a wave's figures (and the control cohort's, for context)."""
    if gate.metric == "install_success":
        return _evaluate_install_success(gate, canary)
    metric = METRICS[gate.metric]
    value, sample = canary.value(gate.metric), canary.sample(metric.sample)
    minimum = gate.min_samples if gate.min_samples is not None else metric.default_min
    control_value = control.value(gate.metric) if control is not None else None
    threshold, why_no_threshold = _threshold(gate, control, minimum)

    def result(status: str, reason: str) -> GateResult:
        return GateResult(gate.text, gate.metric, status, value, threshold, sample, minimum, control_value, reason)

    if value is None or sample < minimum:
        return result("wait", f"needs {minimum} {metric.sample}, has {_count(sample)}")
    if threshold is None:
        return result("wait", why_no_threshold)
    verdict = _OPS[gate.op](value, threshold) or (gate.relative and value == threshold == 0.0)
    reason = _describe(gate, value, threshold, sample, metric, control_value) + _bounded(canary)
    return result("pass" if verdict else "fail", reason)


def evaluate_per_variant(gate: Gate, by_variant: Mapping[str, CohortFigures],
                         control: CohortFigures | None = None) -> GateResult:  # fmt: skip
    """One gate on each variant's cohort: the first failure, else the first wait, else a pass naming them all."""
    if not by_variant:
        return evaluate_gate(gate, CohortFigures(), control)
    results = {variant: evaluate_gate(gate, figures, control) for variant, figures in sorted(by_variant.items())}
    for status in ("fail", "wait"):
        found = [(v, r) for v, r in results.items() if r.status == status]
        if found:
            variant, result = found[0]
            return replace(result, reason=f"variant {variant}: {result.reason}")
    summary = "; ".join(f"{v}: {r.reason}" for v, r in results.items())
    first = next(iter(results.values()))
    return replace(first, reason=f"every variant within the gate ({summary})")


def _threshold(gate: Gate, control: CohortFigures | None, minimum: int) -> tuple[float | None, str]:
    """The absolute threshold, or for a relative gate factor x the control's value once it is trusted."""
    if not gate.relative:
        return gate.threshold, ""
    metric = METRICS[gate.metric]
    if control is None or control.value(gate.metric) is None or control.sample(metric.sample) < minimum:
        have = control.sample(metric.sample) if control is not None else 0
        return None, f"needs {minimum} {metric.sample} from devices on the previous version, has {have}"
    return gate.threshold * float(control.value(gate.metric) or 0.0), ""


def _describe(gate: Gate, value: float, threshold: float, sample: float, metric: Metric, control: float | None) -> str:
    verb = "within" if _OPS[gate.op](value, threshold) or (gate.relative and value == threshold == 0.0) else "breached"
    text = f"{gate.metric}={value:.4g} {verb} {gate.op}{threshold:.4g} over {_count(sample)} {metric.sample}"
    return text + (f" (previous version: {control:.4g})" if control is not None else "")


def _count(sample: float) -> str:
    """A sample size as text: a weighted one (a fraction) to one decimal."""
    return str(sample) if isinstance(sample, int) else f"{sample:.1f}".rstrip("0").rstrip(".")


def _bounded(figures: CohortFigures) -> str:
    """What the reason adds when some devices were counted at a bounded weight."""
    if not figures.bounded_devices:
        return ""
    plural = "s" if figures.bounded_devices > 1 else ""
    return f"; {figures.bounded_devices} device{plural} counted at most as twice the median device"


def _evaluate_install_success(gate: Gate, canary: CohortFigures) -> GateResult:
    """Healthy-after-soak share of settled devices; waits for every device unless already out of reach."""
    settled, total = canary.devices_settled, canary.devices_total
    minimum = gate.min_samples if gate.min_samples is not None else total
    value = canary.value("install_success")
    best_possible = (total - canary.devices_failed - canary.devices_timed_out) / total if total else None
    counts = (
        f"{canary.devices_healthy} healthy, {canary.devices_failed} failed, "
        f"{canary.devices_timed_out} timed out of {total} devices"
    )

    def result(status: str, reason: str) -> GateResult:
        return GateResult(gate.text, gate.metric, status, value, gate.threshold, settled, minimum, None, reason)

    if best_possible is not None and not _OPS[gate.op](best_possible, gate.threshold):
        return result("fail", f"install_success cannot reach {gate.op}{gate.threshold:g}: {counts}")
    if value is None or settled < max(minimum, 1):
        return result("wait", f"waiting for devices to settle: {counts}")
    verdict = _OPS[gate.op](value, gate.threshold)
    verb = "within" if verdict else "breached"
    reason = f"install_success={value:.4g} {verb} {gate.op}{gate.threshold:g}: {counts}"
    return result("pass" if verdict else "fail", reason)
