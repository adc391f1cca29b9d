"""Parse a JSON object whose list members are kept together with their exact source text.

A telemetry batch holds thousands of items that the server stores as opaque JSON. Decoding them
(to validate the few indexed keys) and then encoding them again for storage would do the JSON work
twice; instead the top-level object is walked with :meth:`json.JSONDecoder.raw_decode`, which
reports where each item ends, so each item's original text is stored as is. Decoding is strict
(:mod:`.json_guard`): ``NaN``, ``Infinity``, over-long integers and nesting past the recursion limit
are refused here, and the caller checks each item with :func:`.json_guard.check_value`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bundles.errors import ConfigError
from fleet_server.services.json_guard import raw_decode

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def parse_object_with_item_texts(
    text: str, list_keys: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, list[tuple[Any, str]]]]:
    """``(other_fields, {key: [(item, item_text), ...]})`` for a JSON object; lists under ``list_keys``
    are split into items. A :class:`ConfigError` for anything that is not such an object."""
    try:
        return _parse(text, list_keys)
    except (json.JSONDecodeError, IndexError) as e:
        raise ConfigError(f"the body is not valid JSON ({e})") from e


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _expect(text: str, pos: int, char: str) -> int:
    if text[pos] != char:
        raise ConfigError(f"the body is not a JSON object as expected: {char!r} missing at character {pos}")
    return _skip(text, pos + 1)


def _parse(text: str, list_keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[tuple[Any, str]]]]:
    fields: dict[str, Any] = {}
    lists: dict[str, list[tuple[Any, str]]] = {}
    pos = _expect(text, _skip(text, 0), "{")
    while text[pos] != "}":
        key, pos = raw_decode(text, pos)
        if not isinstance(key, str) or key in fields or key in lists:
            raise ConfigError("the body has a non-string or repeated key")
        pos = _expect(text, _skip(text, pos), ":")
        if key in list_keys and text[pos] == "[":
            lists[key], pos = _items(text, pos, key)
        else:
            fields[key], pos = raw_decode(text, pos, key)
        pos = _skip(text, pos)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos] != "}":
            raise ConfigError(f"the body is not valid JSON: ',' or '}}' expected at character {pos}")
    if _skip(text, pos + 1) != len(text):
        raise ConfigError("the body has data after its JSON object")
    return fields, lists


def _items(text: str, pos: int, key: str) -> tuple[list[tuple[Any, str]], int]:
    items: list[tuple[Any, str]] = []
    pos = _expect(text, pos, "[")
    while text[pos] != "]":
        item, end = raw_decode(text, pos, f"{key}[{len(items)}]")
        items.append((item, text[pos:end]))
        pos = _skip(text, end)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos] != "]":
            raise ConfigError(f"the body is not valid JSON: ',' or ']' expected at character {pos}")
    return items, pos + 1
