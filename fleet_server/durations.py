"""The one duration grammar of the fleet server: every CLI option and API field that takes a duration.

``500ms``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1.5m`` or a plain number of seconds (units are
case-insensitive, spaces around the number and unit are allowed). Seconds are what the code stores,
so the result is in seconds; :func:`parse_whole_seconds` is for the fields stored as whole seconds
(token lifetimes, poll intervals, drift lookbacks). Every refusal is a :class:`~bundles.errors.ConfigError`
naming the text, which the CLI prints as one line and the API answers with a 400.
"""

from __future__ import annotations

import math
import re

from bundles.errors import ConfigError

UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
MAX_DURATION_S = 366 * 86_400.0
"""The longest duration anyone may give: a year (a longer one is a typo, and breaks date arithmetic)."""

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration_s(text: str | float | int, max_s: float = MAX_DURATION_S) -> float:
    """Seconds in ``text`` (see the module docstring); at least zero and at most ``max_s``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION_RE.match(str(text).lower())
        if not match:
            raise ConfigError(f"duration {_shown(text)} is not a number with an optional unit ms, s, m, h, d or w")
        seconds = float(match.group(1)) * UNITS_S[match.group(2) or "s"]
    if seconds < 0 or not math.isfinite(seconds):
        raise ConfigError(f"duration {_shown(text)} must be zero or positive")
    if seconds > max_s:
        raise ConfigError(f"duration {_shown(text)} is over the limit of {format_duration(max_s)}")
    return seconds


def parse_whole_seconds(text: str | int, min_s: int = 1, max_s: int = int(MAX_DURATION_S)) -> int:
    """:func:`parse_duration_s` for a field stored in whole seconds, between ``min_s`` and ``max_s``."""
    seconds = parse_duration_s(text, max_s)
    if seconds != int(seconds):
        raise ConfigError(f"duration {_shown(text)} is not a whole number of seconds")
    if seconds < min_s:
        raise ConfigError(f"duration {_shown(text)} is under the minimum of {format_duration(min_s)}")
    return int(seconds)


def format_duration(seconds: float) -> str:
    """The largest unit that divides ``seconds`` exactly: ``86400`` -> ``1d``, ``90`` -> ``90s``."""
    for unit, size in sorted(UNITS_S.items(), key=lambda kv: -kv[1]):
        count = seconds / size
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def _shown(text: object) -> str:
    """The offending text as the error quotes it (bounded: it may come from an API body)."""
    return repr(str(text)[:40])
