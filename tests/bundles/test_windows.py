"""The window merge rule is shared by device and server: addition, associative, tolerant of gaps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bundles.windows import LATENCY_EDGES_MS, MERGED_FIELDS, merge_fields, sum_nested

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
