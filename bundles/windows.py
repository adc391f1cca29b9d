"""The metric-window contract shared by the device (which writes windows) and the server (which adds them).

A metric window is sums and counts only (``docs/telemetry.md``): counters, a latency histogram on
the fixed :data:`LATENCY_EDGES_MS`, per-feature histograms on the bundle's baseline bins, the output
distribution and shadow agreement. Any set of windows therefore merges into one by adding
element-wise, which is what the device's offline buffer does to save space and what the server does
to sum a device over a day or a cohort over an hour. Both sides use these functions so that the two
can never disagree on the rule.

A window is also the one thing a device sends that the server adds up, so its numbers are checked
against the contract at both ends: :func:`check_window` refuses (with the field named) any count
that is not an integer in ``[0, MAX_COUNT]``, any sum that is not finite and in ``[0, MAX_SUM]``,
histograms longer than their bounds, names that are not short strings, and counts that contradict
each other (more errors than requests, more shadow agreements than comparisons). The server runs it
on intake (a bad window is a 400 naming the field) and again on every stored window it merges
(:func:`merge_valid`), so that a window stored before these checks, or written past them, is left out
and counted rather than able to stop an aggregation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bundles.errors import ConfigError

LATENCY_EDGES_MS: tuple[float, ...] = tuple(10 ** (k / 10) for k in range(-20, 51))
"""Latency bucket edges in ms: 0.01 ms to 100 s, ten per decade (71 edges, 72 buckets)."""

TOKENS_PER_S_EDGES: tuple[float, ...] = tuple(10 ** (k / 10) for k in range(-10, 51))
"""Decode-speed bucket edges in tokens/s: 0.1 to 100,000, ten per decade (61 edges, 62 buckets)."""

MERGED_FIELDS = ("counters", "latency_ms", "features", "output", "shadow", "llm")
"""The fields of a window payload that add up; the rest (ids, times) describe it."""

MAX_COUNT = 10**12
"""The largest count a window may hold (a million requests a second for eleven days)."""
MAX_SUM = 1e15
"""The largest sum (of milliseconds) a window may hold."""
MAX_BINS = 4096
"""The most bins a feature or output histogram may have."""
MAX_HISTOGRAMS = 1024
"""The most features (or outputs) a window may carry histograms for."""
MAX_NAMES = 256
"""The most keys a counter group (``sources``, ``fallback_reasons``, ...) may have."""
MAX_NAME_CHARS = 200
"""The longest feature, output or counter name."""
SUM_KEYS = frozenset({"sum", "latency_ms_sum"})
"""Keys whose values are sums of milliseconds (finite floats), not counts."""
SCALAR_COUNTERS = frozenset({"requests", "rows", "errors", "fallbacks", "low_confidence"})
"""Counters that are one count each; the other counter keys may be groups of name -> count."""


def check_window(payload: Any, where: str = "window") -> None:
    """Refuse a window payload whose merged fields break the contract (:class:`ConfigError` naming the field)."""
    if not isinstance(payload, Mapping):
        raise ConfigError(f"{where}: expected an object")
    if not _plainly_valid(payload):
        _check_fields(payload, where)


def _check_fields(payload: Mapping[str, Any], where: str) -> None:
    """The field-by-field checks (what :func:`_plainly_valid` does not vouch for, and every error message)."""
    _check_counters(payload.get("counters"), f"{where}.counters")
    _check_latency(payload.get("latency_ms"), f"{where}.latency_ms")
    for key in ("features", "output"):
        _check_histograms(payload.get(key), f"{where}.{key}")
    _check_shadow(payload.get("shadow"), f"{where}.shadow")
    _check_llm(payload.get("llm"), f"{where}.llm")


def is_valid_window(payload: Any) -> bool:
    """Whether :func:`check_window` accepts ``payload`` (never raises)."""
    try:
        check_window(payload)
    except (ConfigError, RecursionError):
        return False
    return True


def merge_valid(payloads: Iterable[Any]) -> tuple[dict[str, Any], int]:
    """The sum of the valid windows among ``payloads`` and how many were left out as invalid; never raises."""
    valid, skipped = [], 0
    for payload in payloads:
        if is_valid_window(payload):
            valid.append(payload)
        else:
            skipped += 1
    return merge_fields(valid), skipped


def _plainly_valid(payload: Mapping[str, Any]) -> bool:
    """Whether ``payload`` is a window as agents write it and certainly valid, checked in a few bulk operations.

    The server checks every stored window again when it folds it (thousands a tick): this fast path
    accepts the common shape (flat counters, every count an ``int``) with one type scan over all the
    counts at once; anything else (groups of counters, float counts, a bad value) returns False and
    gets the field-by-field checks, which name what is wrong.
    """
    return window_parts(payload) is not None


PartsShape = tuple[Any, ...]
"""Which merged fields a window has, their keys in order and each list's length (see :func:`window_parts`)."""


def window_parts(payload: Mapping[str, Any]) -> tuple[PartsShape, list[int], list[float]] | None:
    """A window the bulk check vouches for (:func:`_plainly_valid`), taken apart: its shape, its counts and its
    sums (each in shape order); None for any other window.

    Windows of one shape add up column by column (:func:`merge_window_parts`), which costs a fraction
    of :func:`merge_fields`'s walk of each window's fields.
    """
    get = payload.get
    if get("llm") is not None:  # a language model's generations: the field-by-field checks
        return None
    counters, latency, shadow = get("counters", _EMPTY), get("latency_ms", _EMPTY), get("shadow", _EMPTY)
    features, output = get("features", _EMPTY), get("output", _EMPTY)
    if not (type(counters) is type(latency) is type(shadow) is type(features) is type(output) is dict):
        return None
    if len(counters) > MAX_NAMES or len(latency) > 8 or len(shadow) > 16 or len(features) > MAX_HISTOGRAMS:
        return None
    if len(output) > MAX_HISTOGRAMS or not _names([*counters, *latency, *shadow, *features, *output]):
        return None
    latency_counts = latency.get("counts", _NO_COUNTS)
    if type(latency_counts) is not list or len(latency_counts) > len(LATENCY_EDGES_MS) + 1:
        return None
    histograms = [*features.values(), *output.values()]
    if histograms and (not set(map(type, histograms)) == {list} or max(map(len, histograms)) > MAX_BINS):
        return None
    counts: list[Any] = [*latency_counts, *counters.values(), *itertools.chain.from_iterable(histograms)]
    sums = [value for key, value in latency.items() if key != "counts"]
    for key, value in shadow.items():
        (sums if key in SUM_KEYS else counts).append(value)
    if any(type(value) not in (int, float) or not 0 <= value <= MAX_SUM for value in sums):  # NaN compares False
        return None
    if counts and not _plain_counts(counts):
        return None
    requests: int = counters.get("requests", 0)
    if not (counters.get("errors", 0) <= requests and counters.get("fallbacks", 0) <= requests
            and shadow.get("agreed", 0) <= shadow.get("compared", 0)):  # fmt: skip
        return None
    shape = (tuple(counters) if "counters" in payload else None, tuple(latency) if "latency_ms" in payload else None,
             len(latency_counts), _histogram_shape(payload, "features"), _histogram_shape(payload, "output"),
             tuple(shadow) if "shadow" in payload else None)  # fmt: skip
    return shape, counts, sums


_EMPTY: dict[str, Any] = {}
_NO_COUNTS: list[int] = []


def _histogram_shape(payload: Mapping[str, Any], key: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    histograms = payload.get(key)
    return (tuple(histograms), tuple(map(len, histograms.values()))) if histograms is not None else None


def merge_window_parts(
    parts: Iterable[tuple[PartsShape, list[int], list[float]]], others: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """What :func:`merge_fields` gives for the windows taken apart as ``parts`` and the windows ``others``."""
    by_shape: dict[PartsShape, tuple[list[list[int]], list[list[float]]]] = {}
    for shape, counts, sums in parts:
        group = by_shape.setdefault(shape, ([], []))
        group[0].append(counts)
        group[1].append(sums)
    merged = [_assemble(shape, _column_sums(counts), _column_sums(sums)) for shape, (counts, sums) in by_shape.items()]
    rest = list(others)
    return merged[0] if len(merged) == 1 and not rest else merge_fields([*merged, *rest])


def _column_sums(rows: list[list[Any]]) -> list[Any]:
    return [sum(column) for column in zip(*rows, strict=True)]


def _assemble(shape: PartsShape, counts: list[int], sums: list[float]) -> dict[str, Any]:
    """The window of ``shape`` whose counts and sums (in :func:`window_parts`'s order) are these."""
    counter_keys, latency_keys, latency_len, features, output, shadow_keys = shape
    out: dict[str, Any] = {}
    at, sum_at = latency_len, 0
    if counter_keys is not None:
        out["counters"] = dict(zip(counter_keys, counts[at : at + len(counter_keys)], strict=True))
        at += len(counter_keys)
    if latency_keys is not None:
        latency: dict[str, Any] = {}
        for key in latency_keys:
            if key == "counts":
                latency[key] = counts[:latency_len]
            else:
                latency[key], sum_at = sums[sum_at], sum_at + 1
        out["latency_ms"] = latency
    for field, histograms in (("features", features), ("output", output)):
        if histograms is not None:
            out[field] = {}
            for name, length in zip(*histograms, strict=True):
                out[field][name], at = counts[at : at + length], at + length
    if shadow_keys is not None:
        shadow: dict[str, Any] = {}
        for key in shadow_keys:
            if key in SUM_KEYS:
                shadow[key], sum_at = sums[sum_at], sum_at + 1
            else:
                shadow[key], at = counts[at], at + 1
        out["shadow"] = shadow
    return out


def _names(keys: list[Any]) -> bool:
    """Whether every key is a name: a string of 1 to :data:`MAX_NAME_CHARS` characters of valid Unicode text
    (passes in C; only non-ASCII names are encoded)."""
    if not keys:
        return True
    if set(map(type, keys)) != {str}:
        return False
    lengths = list(map(len, keys))
    if not (min(lengths) > 0 and max(lengths) <= MAX_NAME_CHARS):
        return False
    return all(map(str.isascii, keys)) or all(map(_is_text, keys))


def _is_text(name: str) -> bool:
    """Whether ``name`` is valid Unicode text (no lone UTF-16 surrogate, which no UTF-8 store or answer can hold)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_counters(value: Any, where: str) -> None:
    if value is None:
        return
    counts = _object(value, where, MAX_NAMES)
    for key, item in counts.items():
        if isinstance(item, Mapping) and key not in SCALAR_COUNTERS:
            for name, count in _object(item, f"{where}.{key}", MAX_NAMES).items():
                check_count(count, f"{where}.{key}.{name}")
        else:
            check_count(item, f"{where}.{key}")
    requests = counts.get("requests", 0)
    for key in ("errors", "fallbacks"):
        if counts.get(key, 0) > requests:
            raise ConfigError(f"{where}.{key}: {counts[key]} is more than the window's {requests} requests")


def _check_latency(value: Any, where: str) -> None:
    if value is None:
        return
    latency = _object(value, where, 8)
    counts = latency.get("counts")
    if counts is not None:
        _check_list(counts, f"{where}.counts", len(LATENCY_EDGES_MS) + 1)
    for key, item in latency.items():
        if key != "counts":
            check_sum(item, f"{where}.{key}")


def _check_histograms(value: Any, where: str) -> None:
    if value is None:
        return
    for name, counts in _object(value, where, MAX_HISTOGRAMS).items():
        _check_list(counts, f"{where}.{name}", MAX_BINS)


def _check_shadow(value: Any, where: str) -> None:
    if value is None:
        return
    shadow = _object(value, where, 16)
    for key, item in shadow.items():
        (check_sum if key in SUM_KEYS else check_count)(item, f"{where}.{key}")
    if shadow.get("agreed", 0) > shadow.get("compared", 0):
        raise ConfigError(f"{where}.agreed: more agreements than the {shadow.get('compared', 0)} comparisons")


def _check_llm(value: Any, where: str) -> None:
    """Generations of a language model: counts, token sums, stop reasons, TTFT and tokens/s histograms."""
    if value is None:
        return
    llm = _object(value, where, 8)
    for key in ("generations", "prompt_tokens", "completion_tokens"):
        check_count(llm.get(key, 0), f"{where}.{key}")
    for name, count in _object(llm.get("stop_reasons") or {}, f"{where}.stop_reasons", MAX_NAMES).items():
        check_count(count, f"{where}.stop_reasons.{name}")
    for key, edges in (("ttft_ms", LATENCY_EDGES_MS), ("tokens_per_s", TOKENS_PER_S_EDGES)):
        counts = _object(llm.get(key) or {}, f"{where}.{key}", 1).get("counts")
        if counts is not None:
            _check_list(counts, f"{where}.{key}.counts", len(edges) + 1)


def _object(value: Any, where: str, max_keys: int) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
    if len(value) > max_keys:
        raise ConfigError(f"{where}: {len(value)} keys; at most {max_keys}")
    for key in value:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_NAME_CHARS or not _is_text(key):
            raise ConfigError(f"{where}: keys must be names of 1 to {MAX_NAME_CHARS} characters of valid Unicode text")
    return value


def _check_list(value: Any, where: str, max_len: int) -> None:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of counts, got {type(value).__name__}")
    if len(value) > max_len:
        raise ConfigError(f"{where}: {len(value)} entries; at most {max_len}")
    if value and _plain_counts(value):
        return
    for i, count in enumerate(value):
        check_count(count, f"{where}[{i}]")


def _plain_counts(values: list[Any]) -> bool:
    """Whether every value is an ``int`` in range (the common case, checked without a Python loop)."""
    return set(map(type, values)) == {int} and min(values) >= 0 and max(values) <= MAX_COUNT


def check_count(value: Any, where: str) -> None:
    """A count: an integer (``3`` or ``3.0``) in ``[0, MAX_COUNT]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a count, got {type(value).__name__}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"{where}: {value!r} is not a whole number")
    if not 0 <= value <= MAX_COUNT:
        raise ConfigError(f"{where}: {_short(value)} is outside [0, {MAX_COUNT}]")


def check_sum(value: Any, where: str) -> None:
    """A sum of milliseconds: a finite number in ``[0, MAX_SUM]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= MAX_SUM):
        raise ConfigError(f"{where}: {_short(value)} is not a finite number in [0, {MAX_SUM:g}]")


def _short(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


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
        maps = [v for v in present if isinstance(v, Mapping)]
        keys = dict.fromkeys(k for v in maps for k in v)
        return {k: sum_nested([v.get(k) for v in maps]) for k in keys}
    if isinstance(first, list):
        return _sum_lists([v for v in present if isinstance(v, list)])
    numbers = [v for v in present if type(v) in (int, float)]  # not bool: True is no count
    return sum(numbers) if numbers else present[-1]


def _sum_lists(rows: list[list[Any]]) -> Any:
    width = max(len(r) for r in rows)
    if any(len(r) != width for r in rows):
        rows = [r + [0] * (width - len(r)) for r in rows]
    try:  # plain Python ints (what valid windows hold) add up column by column faster than numpy converts them
        sums = [sum(column) for column in zip(*rows, strict=True)]
        if all(type(total) is int for total in sums):
            return sums
    except TypeError:
        pass
    try:
        return np.asarray(rows).sum(axis=0).tolist()
    except (TypeError, ValueError):  # not numbers: keep the newest
        return rows[-1]


__all__ = [
    "LATENCY_EDGES_MS",
    "TOKENS_PER_S_EDGES",
    "MAX_BINS",
    "MAX_COUNT",
    "MAX_HISTOGRAMS",
    "MAX_NAMES",
    "MAX_NAME_CHARS",
    "MAX_SUM",
    "MERGED_FIELDS",
    "check_count",
    "check_sum",
    "check_window",
    "is_valid_window",
    "merge_fields",
    "merge_valid",
    "merge_window_parts",
    "sum_nested",
    "window_parts",
]
