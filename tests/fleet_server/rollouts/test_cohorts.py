"""Deterministic cohorts and download pacing."""

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.cohorts import cohort_position, plan_cohorts, release_quota, start_after
from fleet_server.rollouts.spec import WaveSpec, parse_waves

DEVICES = [f"dev-{i:04d}" for i in range(1000)]


def test_positions_are_stable_and_in_the_unit_interval():
    positions = [cohort_position(d, 17) for d in DEVICES]
    assert positions == [cohort_position(d, 17) for d in DEVICES]
    assert all(0.0 <= p < 1.0 for p in positions)
    # roughly uniform: each decile holds 100 +- 40 of 1000
    deciles = [sum(1 for p in positions if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    assert all(60 <= n <= 140 for n in deciles), deciles


def test_cohorts_do_not_depend_on_input_order_and_differ_between_rollouts():
    waves = parse_waves("1%,10%,50%,100%")
    first = plan_cohorts(DEVICES, 17, waves)
    assert first == plan_cohorts(list(reversed(DEVICES)), 17, waves)
    assert plan_cohorts(DEVICES, 18, waves)[0] != first[0]


def test_cohorts_partition_the_target_set_with_exact_cumulative_sizes():
    cohorts = plan_cohorts(DEVICES, 17, parse_waves("1%,10%,50%,100%"))
    assert [len(c) for c in cohorts] == [10, 90, 400, 500]
    flat = [d for c in cohorts for d in c]
    assert sorted(flat) == sorted(DEVICES) and len(set(flat)) == len(flat)


def test_earlier_waves_hold_the_lowest_positions():
    cohorts = plan_cohorts(DEVICES, 17, parse_waves("1%,100%"))
    assert max(cohort_position(d, 17) for d in cohorts[0]) < min(cohort_position(d, 17) for d in cohorts[1])


def test_small_fleets_get_a_one_device_canary_and_empty_later_waves_stay_empty():
    cohorts = plan_cohorts(DEVICES[:5], 3, parse_waves("1%,10%,50%,100%"))
    assert [len(c) for c in cohorts] == [1, 0, 2, 2]


def test_start_after_is_release_time_plus_a_stable_jitter_within_bounds():
    released = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    starts = [start_after(d, 17, released, jitter_s=60) for d in DEVICES[:200]]
    assert starts == [start_after(d, 17, released, jitter_s=60) for d in DEVICES[:200]]
    offsets = [(s - released).total_seconds() for s in starts]
    assert all(0 <= o < 60 for o in offsets) and max(offsets) - min(offsets) > 45
    assert start_after("x", 1, released, jitter_s=0) == released


def test_release_quota_respects_the_concurrency_cap():
    assert release_quota(in_flight=0, waiting=1000, max_concurrent=None) == 1000
    assert release_quota(in_flight=0, waiting=1000, max_concurrent=50) == 50
    assert release_quota(in_flight=45, waiting=1000, max_concurrent=50) == 5
    assert release_quota(in_flight=50, waiting=1000, max_concurrent=50) == 0
    assert release_quota(in_flight=60, waiting=1000, max_concurrent=50) == 0
    assert release_quota(in_flight=0, waiting=3, max_concurrent=50) == 3


percent_waves = st.floats(0.01, 100).map(lambda p: WaveSpec(percent=p))
count_waves = st.integers(1, 300).map(lambda c: WaveSpec(count=c))
wave_lists = st.lists(st.one_of(percent_waves, count_waves), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), waves=wave_lists, rollout_id=st.integers(1, 10_000))
def test_cohorts_are_disjoint_cumulative_and_order_free(n, waves, rollout_id):
    devices = [f"d{i}" for i in range(n)]
    cohorts = plan_cohorts(devices, rollout_id, waves)
    flat = [d for c in cohorts for d in c]
    assert len(flat) == len(set(flat)) and set(flat) <= set(devices)
    expected = 0
    for k, wave in enumerate(waves):
        expected = max(expected, wave.cumulative_size(n))
        assert sum(len(c) for c in cohorts[: k + 1]) == expected
    assert plan_cohorts(list(reversed(devices)), rollout_id, waves) == cohorts
