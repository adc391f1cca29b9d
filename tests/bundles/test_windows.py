"""The window merge rule is shared by device and server: addition, associative, tolerant of gaps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bundles.errors import ConfigError
from bundles.windows import (
    LATENCY_EDGES_MS,
    MERGED_FIELDS,
    _check_fields,
    _plainly_valid,
    is_valid_window,
    merge_fields,
    merge_window_parts,
    sum_nested,
    window_parts,
)

counts = st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=6)
window = st.fixed_dictionaries(
    {
        "counters": st.dictionaries(st.sampled_from(["requests", "errors", "fallbacks"]), st.integers(0, 10**6)),
        "latency_ms": counts,
        "features": st.dictionaries(st.sampled_from(["x.mean", "x.std"]), counts),
    }
)


@given(st.lists(window, min_size=1, max_size=8), st.integers(min_value=0, max_value=8))
def test_merging_is_associative_so_devices_and_server_can_merge_in_any_grouping(windows: list, cut: int) -> None:
    whole = merge_fields(windows)
    left, right = windows[:cut], windows[cut:]
    parts = [merge_fields(p) for p in (left, right) if p]
    assert merge_fields(parts) == whole


def test_counts_add_and_shorter_histograms_are_padded_with_zeros() -> None:
    merged = merge_fields([{"latency_ms": [1, 2], "counters": {"requests": 3}}, {"latency_ms": [1, 0, 5]}])
    assert merged == {"latency_ms": [2, 2, 5], "counters": {"requests": 3}}


def test_a_label_is_kept_not_added_and_missing_values_count_as_zero() -> None:
    assert sum_nested(["digits", "digits"]) == "digits"
    assert sum_nested([None, 2, None, 3]) == 5
    assert sum_nested([None, None]) is None


def test_only_the_additive_fields_are_merged() -> None:
    merged = merge_fields([{"id": "a", "start": "t0", "counters": {"requests": 1}}])
    assert set(merged) <= set(MERGED_FIELDS)


def test_latency_edges_span_ten_microseconds_to_one_hundred_seconds_ten_per_decade() -> None:
    assert len(LATENCY_EDGES_MS) == 71
    assert abs(LATENCY_EDGES_MS[0] - 0.01) < 1e-12 and abs(LATENCY_EDGES_MS[-1] - 100_000) < 1e-6


number = st.one_of(
    st.integers(-2, 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
loose_counts = st.lists(st.one_of(st.integers(0, 100), number), max_size=5)
loose_window = st.fixed_dictionaries(
    {},
    optional={
        "counters": st.one_of(
            st.dictionaries(st.sampled_from(["requests", "errors", "fallbacks", "sources", ""]),
                            st.one_of(st.integers(0, 100), number, st.dictionaries(st.text(max_size=3), number))),
            number,
        ),
        "latency_ms": st.one_of(st.fixed_dictionaries({"counts": loose_counts}, optional={"sum": number}), number),
        "features": st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(loose_counts, number)), number),
        "output": st.dictionaries(st.sampled_from(["label"]), loose_counts),
        "shadow": st.dictionaries(st.sampled_from(["compared", "agreed", "latency_ms_sum"]), number),
        "llm": st.one_of(
            number, st.dictionaries(st.sampled_from(["generations", "completion_tokens", "stop_reasons"]), number)
        ),
    },
)  # fmt: skip


@given(loose_window)
def test_the_bulk_check_of_folded_windows_accepts_only_what_the_field_checks_accept(payload: dict) -> None:
    """``check_window`` takes a fast path for the usual window; it must never let through what the
    field-by-field checks (which name the bad field) refuse."""
    try:
        _check_fields(payload, "window")
        accepted_field_by_field = True
    except ConfigError:
        accepted_field_by_field = False
    assert is_valid_window(payload) == accepted_field_by_field
    if _plainly_valid(payload):
        assert accepted_field_by_field


def test_a_window_as_agents_write_it_takes_the_bulk_check() -> None:
    payload = {"counters": {"requests": 60, "rows": 60, "errors": 1, "fallbacks": 0},
               "latency_ms": {"counts": [0] * 24 + [60] + [0] * 47, "sum": 120.0},
               "features": {"f0": [8, 7, 6]}, "output": {"label": [17, 17, 26]},
               "shadow": {"compared": 3, "agreed": 2}}  # fmt: skip
    assert _plainly_valid(payload)
    assert not _plainly_valid({**payload, "counters": {"requests": 60, "errors": 61}})
    assert not _plainly_valid({**payload, "latency_ms": {"counts": [1], "sum": float("nan")}})


quarters = st.integers(0, 4000).map(lambda k: k / 4)  # sums whose additions are exact in any order
small_counts = st.lists(st.integers(0, 50), max_size=4)
plain_window = st.fixed_dictionaries(
    {},
    optional={
        "counters": st.dictionaries(st.sampled_from(["requests", "rows", "low_confidence"]), st.integers(0, 100)),
        "latency_ms": st.fixed_dictionaries({}, optional={"counts": small_counts, "sum": quarters}),
        "features": st.dictionaries(st.sampled_from(["f0", "f1"]), small_counts),
        "output": st.dictionaries(st.sampled_from(["label"]), small_counts),
        "shadow": st.fixed_dictionaries({"compared": st.integers(5, 9)},
                                        optional={"agreed": st.integers(0, 5), "latency_ms_sum": quarters}),
        "id": st.text(max_size=3),
    },
)  # fmt: skip


@given(st.lists(plain_window, min_size=1, max_size=10))
def test_windows_taken_apart_add_up_to_what_merging_them_gives(windows: list) -> None:
    """The fold sums windows of one shape column by column; the result is the merge rule's, whatever the shapes."""
    parts = [window_parts(w) for w in windows]
    assert all(p is not None for p in parts)  # every one of these is a window as agents write it
    assert merge_window_parts([p for p in parts if p is not None]) == merge_fields(windows)


@given(st.lists(plain_window, max_size=4), st.lists(loose_window, max_size=4))
def test_windows_taken_apart_and_whole_windows_merge_together(plain: list, loose: list) -> None:
    others = [w for w in loose if is_valid_window(w) and window_parts(w) is None]
    parts = [p for p in map(window_parts, plain) if p is not None]
    if parts or others:
        assert merge_window_parts(parts, others) == merge_fields([merge_fields(plain), *others] if plain else others)
