"""Strict JSON: what a client may send, checked before anything stores, sums or echoes it.

Python's ``json`` module accepts more than JSON: ``NaN`` and ``Infinity``, ``1e309`` (read as an
infinite float), integers of thousands of digits, strings holding lone UTF-16 surrogates
(``"\\ud800"``), and nesting until the interpreter's recursion limit. Each of those has turned a
request into a 500 somewhere downstream (PostgreSQL refusing the text in ``COPY``, a sum
overflowing, a JSON response that cannot be encoded), so every JSON body is decoded here instead:

- :func:`raw_decode` turns every decoding failure into a 400: malformed JSON, integer literals past
  Python's 4,300-digit limit, nesting past the interpreter's recursion limit;
- :func:`check_value` walks the result once and refuses non-finite floats, integers outside
  ``[-2**63, 2**63)``, strings that are not valid Unicode (lone surrogates) or longer than a bound,
  keys that are not strings, and nesting deeper than :data:`MAX_DEPTH`; the error names the field
  (``windows[0].counters.requests: inf is not a finite number``).

The walk builds no paths on the happy path: a failure carries its path back up as it unwinds.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bundles.errors import ConfigError

MAX_DEPTH = 32
"""The deepest nesting of objects and arrays accepted in a request body (and in a telemetry item)."""
MAX_TEXT_CHARS = 65_536
"""The longest string accepted inside a JSON body."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


_DECODER = json.JSONDecoder()


class _BadValue(Exception):
    """A refused value; ``path`` grows (innermost first) as the walk unwinds."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str | int] = []


def raw_decode(text: str, pos: int, where: str = "body") -> tuple[Any, int]:
    """Decode one JSON value at ``pos``; returns the value and where it ends (json.JSONDecodeError for
    malformed JSON, :class:`ConfigError` for what the decoder cannot hold)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except RecursionError as e:
        raise ConfigError(f"{_printable(where)}: nested deeper than {MAX_DEPTH} levels") from e
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer literal over Python's digit limit
        raise ConfigError(f"{_printable(where)}: {e}") from e


def loads(data: bytes | str, where: str = "body") -> Any:
    """A whole JSON document, decoded strictly and checked with :func:`check_value`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        value, end = raw_decode(text, _skip_space(text, 0), where)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg} at character {e.pos})") from e
    if _skip_space(text, end) != len(text):
        raise ConfigError(f"{where}: data after the JSON value")
    check_value(value, where)
    return value


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def check_value(value: Any, where: str = "body", max_text_chars: int = MAX_TEXT_CHARS) -> None:
    """Refuse (``ConfigError`` naming the field) what :mod:`json` accepts but JSON and our storage do not."""
    try:
        _walk(value, 0, max_text_chars)
    except _BadValue as e:
        raise ConfigError(f"{_path(where, e.path)}: {e.reason}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None


def _path(where: str, parts: list[str | int]) -> str:
    out = where
    for part in reversed(parts):
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _walk(value: Any, depth: int, max_chars: int) -> None:
    kind = type(value)
    if kind is str:
        _check_text(value, max_chars)
    elif kind is float:
        if not math.isfinite(value):
            raise _BadValue(f"{value!r} is not a finite number")
    elif kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise _BadValue("an integer outside the 64-bit range")
    elif kind is dict:
        _walk_object(value, depth + 1, max_chars)
    elif kind is list:
        _walk_array(value, depth + 1, max_chars)
    elif value is not None and kind is not bool:
        raise _BadValue(f"unexpected {kind.__name__}")


def _walk_object(value: dict[Any, Any], depth: int, max_chars: int) -> None:
    if depth > MAX_DEPTH:
        raise _BadValue(f"nested deeper than {MAX_DEPTH} levels")
    for key, item in value.items():
        try:
            _check_text(key, min(max_chars, 1000))
            _walk(item, depth, max_chars)
        except _BadValue as e:
            e.path.append(_printable(key))
            raise


def _walk_array(value: list[Any], depth: int, max_chars: int) -> None:
    if depth > MAX_DEPTH:
        raise _BadValue(f"nested deeper than {MAX_DEPTH} levels")
    for i, item in enumerate(value):
        kind = type(item)  # tensors and histograms: long runs of plain numbers, checked inline
        if (kind is float and math.isfinite(item)) or (kind is int and INT64_MIN <= item <= INT64_MAX):
            continue
        try:
            _walk(item, depth, max_chars)
        except _BadValue as e:
            e.path.append(i)
            raise


def _check_text(text: Any, max_chars: int) -> None:
    if not isinstance(text, str):
        raise _BadValue("keys must be strings")
    if len(text) > max_chars:
        raise _BadValue(f"a string of {len(text)} characters; at most {max_chars}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadValue("not valid Unicode text (a lone UTF-16 surrogate)") from None


def printable_json(value: Any) -> Any:
    """Stored JSON as it can always be answered: lone surrogates in strings and keys escaped (``\\udfff``),
    non-finite floats as None, nesting past the interpreter's limit as None.

    Rows stored before intake's strict check (or written past it) may hold either, and an answer that
    echoes them would fail to encode (a 500 on every read of the row): views of device-sent JSON (an
    inventory, event payloads, samples) go through this first."""
    try:
        return _printable_value(value)
    except RecursionError:
        return None


def _printable_value(value: Any) -> Any:
    if isinstance(value, str):
        return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_printable_value(k): _printable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_value(v) for v in value]
    return value


def _printable(key: Any) -> str:
    """A key as it can be shown in an error message (lone surrogates escaped, long keys cut)."""
    text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["MAX_DEPTH", "MAX_TEXT_CHARS", "check_value", "loads", "printable_json", "raw_decode"]
