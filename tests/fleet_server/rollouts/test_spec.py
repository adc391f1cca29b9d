"""Parsing what an operator types: bundle references, waves and policies (durations: ``test_cli_common.py``)."""

import pytest

from bundles.errors import ConfigError
from fleet_server.rollouts.spec import RolloutPolicy, WaveSpec, parse_bundle_ref, parse_waves


def test_bundle_ref_splits_name_and_version():
    assert parse_bundle_ref("digits@3") == ("digits", 3)
    for bad in ("digits", "digits@", "Digits@3", "digits@x"):
        with pytest.raises(ConfigError, match="NAME@VERSION"):
            parse_bundle_ref(bad)


def test_default_waves_are_1_10_50_100_percent():
    assert [w.percent for w in parse_waves()] == [1, 10, 50, 100]


def test_waves_mix_percentages_counts_and_shadow():
    waves = parse_waves("5:shadow,5,50%,100%")
    assert waves == (WaveSpec(count=5, shadow=True), WaveSpec(count=5), WaveSpec(percent=50), WaveSpec(percent=100))
    assert [w.text for w in waves] == ["5:shadow", "5", "50%", "100%"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one wave"),
        ("10%,5%", "cumulative"),
        ("0%", "above 0"),
        ("101%", "at most 100"),
        ("2.5", "whole number"),
        ("ten", "percentage"),
    ],
)
def test_bad_waves_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_waves(text)


@pytest.mark.parametrize(
    ("wave", "total", "size"),
    [
        (WaveSpec(percent=1), 20, 1),  # never an empty canary
        (WaveSpec(percent=1), 1000, 10),
        (WaveSpec(percent=10), 1001, 101),  # rounds up
        (WaveSpec(percent=100), 7, 7),
        (WaveSpec(count=5), 3, 3),
        (WaveSpec(percent=50), 0, 0),
    ],
)
def test_cumulative_wave_sizes(wave, total, size):
    assert wave.cumulative_size(total) == size


def test_policy_round_trips_through_json_form():
    policy = RolloutPolicy(
        waves=parse_waves("1%,100%"),
        gates=("error_rate<0.01",),
        soak_s=60,
        on_breach="pause",
        approval="each_wave",
        max_concurrent_downloads=10,
        jitter_s=5,
    )
    assert RolloutPolicy.from_dict(policy.to_dict()) == policy
    assert RolloutPolicy.from_dict({"soak_s": "30m", "waves": "10%,100%"}).soak_s == 1800


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_breach": "explode"}, "on_breach"),
        ({"approval": "maybe"}, "approval"),
        ({"max_concurrent_downloads": 0}, "at least 1"),
    ],
)
def test_bad_policies_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RolloutPolicy(**kwargs)
