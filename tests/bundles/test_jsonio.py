"""orjson's speed with the standard library's results: every value reads and writes as :mod:`json` would."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundles import jsonio

SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text(max_size=8)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and 1 not equal to 1.0 (what repr tells apart)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(value=VALUES)
def test_what_is_written_is_what_the_standard_library_writes_and_reads_back_the_same(value: Any) -> None:
    written = jsonio.dumps(value)
    assert same(json.loads(written), json.loads(json.dumps(value, separators=(",", ":"))))
    assert same(jsonio.loads(written), json.loads(written))


@pytest.mark.parametrize(
    "raw",
    [b'{"a": NaN}', b"[Infinity, -Infinity]", '{"a": "\u00e9"}'.encode("utf-16"), b'{"a": "\xff"}', b"{", b"",
     b'{"a": 1} x', b"[" * 3000 + b"]" * 3000, b'{"a": 1, "a": 2}', b"1e400", b"-0.0"],
)  # fmt: skip
def test_what_orjson_refuses_is_decided_by_the_standard_library(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except (ValueError, RecursionError) as e:
        with pytest.raises(type(e)):
            jsonio.loads(raw)
        return
    assert same(jsonio.loads(raw), expected)


def test_a_constant_the_caller_refuses_is_refused() -> None:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not a number")

    with pytest.raises(ValueError, match="NaN is not a number"):
        jsonio.loads(b'{"a": NaN}', refuse)


def test_values_orjson_does_not_write_are_written_or_refused_by_the_standard_library() -> None:
    assert jsonio.dumps({"x": np.float64(0.5)}) == b'{"x":0.5}'
    with pytest.raises(TypeError):
        jsonio.dumps({"x": np.float32(0.5)})  # as json.dumps refuses it


def test_without_orjson_the_standard_library_does_all_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonio, "_orjson", None)
    assert jsonio.dumps({"a": [1, 0.5, float("nan")]}) == b'{"a":[1,0.5,NaN]}'
    assert jsonio.loads(b'{"a": [1, 0.5]}') == {"a": [1, 0.5]}


@pytest.mark.parametrize(
    "value",
    [{"a": None, "b": [1.5, 2]}, {"a": [[1.0, float("inf")]], "b": None}, [None, float("nan")], [10**400, None],
     [1e308, 1e308, None], {"x": [1, "a", None, [float("-inf")]]}, (None, 1.0)],
)  # fmt: skip
def test_a_value_holding_none_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    assert jsonio.dumps(value) == json.dumps(value, separators=(",", ":")).encode()
