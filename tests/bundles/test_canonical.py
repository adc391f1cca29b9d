"""Canonical JSON and hashing: same data, same bytes; no value that two readers could disagree on."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundles.canonical import canonical_json, sha256_bytes, sha256_file
from bundles.errors import ManifestError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _shuffled(data: Any, seed: int) -> Any:
    """The same data with every object's keys inserted in another order."""
    if isinstance(data, dict):
        keys = sorted(data, key=lambda k: hashlib.sha256(f"{seed}{k}".encode()).digest())
        return {k: _shuffled(data[k], seed) for k in keys}
    if isinstance(data, list):
        return [_shuffled(v, seed) for v in data]
    return data


@settings(max_examples=80, deadline=None)
@given(JSON, st.integers(0, 1000))
def test_canonical_json_does_not_depend_on_key_order_and_round_trips(data: Any, seed: int) -> None:
    raw = canonical_json(data)
    assert canonical_json(_shuffled(data, seed)) == raw
    assert json.loads(raw) == data
    assert canonical_json(json.loads(raw)) == raw


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.integers(), min_size=2, max_size=6))
def test_canonical_json_sorts_keys_and_has_no_whitespace(data: dict[str, int]) -> None:
    text = canonical_json(data).decode("utf-8")
    parsed_order = list(json.loads(text, object_pairs_hook=lambda pairs: [k for k, _ in pairs]))
    assert parsed_order == sorted(data)
    # No whitespace between tokens: the text is exactly the compact rendering (keys may hold ", " themselves).
    assert text == "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{data[k]}" for k in sorted(data)) + "}"


def test_canonical_json_is_utf8_without_escapes() -> None:
    assert canonical_json({"b": "é", "a": [1, 2.5]}) == '{"a":[1,2.5],"b":"é"}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [1.0, math.nan]}])
def test_canonical_json_rejects_nan_and_infinity(bad: Any) -> None:
    with pytest.raises(ManifestError, match="canonical JSON"):
        canonical_json(bad)


def test_canonical_json_rejects_values_json_cannot_hold() -> None:
    with pytest.raises(ManifestError, match="cannot encode as JSON"):
        canonical_json({"when": object()})


def test_sha256_of_bytes_and_file_agree_with_hashlib(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert sha256_bytes(payload) == expected
    assert sha256_file(path) == expected
