"""What an operator asks for, parsed and validated before anything is stored.

``digits@3`` -> (model, version); ``30m`` -> 1800 s (the server's one duration grammar,
:mod:`fleet_server.durations`); ``1%,10%,50%,100%`` or ``5,20,100%`` -> waves (cumulative: each
entry is how much of the target set has the bundle once that wave is done; a
``:shadow`` suffix makes a wave install the bundle beside the active model instead of in its place).
:class:`RolloutPolicy` gathers the knobs that drive decisions and is stored as JSON on the rollout.
Every parse error is a :class:`~bundles.errors.ConfigError` naming the bad text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bundles.errors import ConfigError
from fleet_server.durations import parse_duration_s

DEFAULT_WAVES = "1%,10%,50%,100%"
ON_BREACH = ("rollback", "pause")
APPROVAL = ("none", "start", "each_wave")

_WAVE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%)?\s*(?::\s*(shadow))?\s*$")
_REF_RE = re.compile(r"^\s*([a-z0-9][a-z0-9._-]{0,63})@(\d+)\s*$")


def parse_bundle_ref(text: str) -> tuple[str, int]:
    """``digits@3`` -> ``("digits", 3)``."""
    match = _REF_RE.match(text)
    if not match:
        raise ConfigError(f"bundle {text!r} is not NAME@VERSION (e.g. digits@3)")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class WaveSpec:
    """One wave: the cumulative share (``percent``) or number (``count``) of target devices."""

    percent: float | None = None
    count: int | None = None
    shadow: bool = False

    def cumulative_size(self, total_devices: int) -> int:
        """How many target devices have the bundle once this wave is done (at least 1 if any)."""
        if total_devices <= 0:
            return 0
        if self.percent is not None:
            return min(total_devices, max(1, math.ceil(self.percent / 100.0 * total_devices - 1e-9)))
        return min(total_devices, self.count or 0)

    @property
    def text(self) -> str:
        """The wave as an operator writes it."""
        base = f"{self.percent:g}%" if self.percent is not None else str(self.count)
        return base + (":shadow" if self.shadow else "")


def parse_waves(text: str | Sequence[str] = DEFAULT_WAVES) -> tuple[WaveSpec, ...]:
    """Waves from ``1%,10%,50%,100%`` (or a list of such tokens); shares must not decrease."""
    tokens = [t for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not tokens:
        raise ConfigError("waves: give at least one wave, e.g. 1%,10%,50%,100%")
    waves = tuple(_parse_wave(token) for token in tokens)
    _check_non_decreasing(waves)
    return waves


def _parse_wave(token: str) -> WaveSpec:
    match = _WAVE_RE.match(token)
    if not match:
        raise ConfigError(f"wave {token.strip()!r} is not a percentage (10%) or a count (25), optionally :shadow")
    number, is_percent, shadow = float(match.group(1)), bool(match.group(2)), bool(match.group(3))
    if is_percent:
        if not 0 < number <= 100:
            raise ConfigError(f"wave {token.strip()!r}: a percentage must be above 0 and at most 100")
        return WaveSpec(percent=number, shadow=shadow)
    if number != int(number) or number < 1:
        raise ConfigError(f"wave {token.strip()!r}: a device count must be a whole number of at least 1")
    return WaveSpec(count=int(number), shadow=shadow)


def _check_non_decreasing(waves: Sequence[WaveSpec]) -> None:
    for kind in ("percent", "count"):
        values = [getattr(w, kind) for w in waves if getattr(w, kind) is not None]
        if any(b < a for a, b in zip(values, values[1:], strict=False)):
            raise ConfigError(f"waves are cumulative: each {kind} must be at least the one before ({values})")


@dataclass(frozen=True)
class RolloutPolicy:
    """The knobs that drive a rollout's decisions; stored as JSON (keys are persisted names)."""

    waves: tuple[WaveSpec, ...] = field(default_factory=lambda: parse_waves(DEFAULT_WAVES))
    gates: tuple[str, ...] = ()
    soak_s: float = 1800.0
    device_timeout_s: float = 3600.0
    on_breach: str = "rollback"
    approval: str = "none"
    max_concurrent_downloads: int | None = None
    jitter_s: float = 60.0
    variant_preferences: tuple[str, ...] = ()
    """Ranked before each device's own preferences when the server picks its variant (targets, precisions,
    ``target:precision``, variant ids or runtime names; :func:`bundles.selection.select_variant`)."""

    def __post_init__(self) -> None:
        if self.on_breach not in ON_BREACH:
            raise ConfigError(f"on_breach {self.on_breach!r} must be one of {', '.join(ON_BREACH)}")
        if self.approval not in APPROVAL:
            raise ConfigError(f"approval {self.approval!r} must be one of {', '.join(APPROVAL)}")
        if self.max_concurrent_downloads is not None and self.max_concurrent_downloads < 1:
            raise ConfigError("max_concurrent_downloads must be at least 1 (or unset for no limit)")
        if not self.waves:
            raise ConfigError("a rollout needs at least one wave")

    def to_dict(self) -> dict[str, Any]:
        """JSON form, waves as their text (``1%``, ``5:shadow``)."""
        out = asdict(self)
        out["waves"] = [w.text for w in self.waves]
        out["gates"] = list(self.gates)
        out["variant_preferences"] = list(self.variant_preferences)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        """Back from :meth:`to_dict` (and from API bodies with the same keys)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "waves" in known:
            known["waves"] = parse_waves(known["waves"])
        if "gates" in known:
            known["gates"] = tuple(known["gates"])
        if "variant_preferences" in known:
            known["variant_preferences"] = tuple(str(p) for p in known["variant_preferences"])
        for key in ("soak_s", "device_timeout_s", "jitter_s"):
            if key in known:
                known[key] = parse_duration_s(known[key])
        return cls(**known)
