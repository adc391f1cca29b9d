"""The routine sampling trial: a countdown over geometric gaps is a Bernoulli(sample_rate) trial per request."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from device_agent.telemetry.sampling import WindowSampler, encode_for_log, redact


def draws(rate: float, n: int, seed: int = 11) -> list[bool]:
    sampler = WindowSampler(rate, reservoir_size=20, max_forced=20, rng=random.Random(seed))
    return [sampler.draw() for _ in range(n)]


@pytest.mark.parametrize("rate", [0.01, 0.2, 0.5])
def test_each_request_is_a_candidate_with_probability_exactly_the_sample_rate(rate: float) -> None:
    n = 200_000
    hits = sum(draws(rate, n))
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(hits - n * rate) < 5 * sigma


def test_trials_are_independent_as_bernoulli_ones_the_gaps_are_geometric() -> None:
    rate, n = 0.05, 400_000
    positions = [i for i, hit in enumerate(draws(rate, n)) if hit]
    gaps = [b - a for a, b in zip(positions[:-1], positions[1:], strict=True)]
    # P(gap = 1) = p, P(gap = 2) = (1 - p) p: a request right after a candidate is no less likely to be one
    for k in (1, 2, 10):
        expected = (1 - rate) ** (k - 1) * rate
        share = gaps.count(k) / len(gaps)
        assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / len(gaps)), k
    assert sum(gaps) / len(gaps) == pytest.approx(1 / rate, rel=0.03)


def test_rate_one_takes_every_request_and_rate_zero_none() -> None:
    assert all(draws(1.0, 1000)) and not any(draws(0.0, 100_000))


def test_a_tensor_over_the_logged_size_keeps_its_shape_and_a_summary_but_not_its_data() -> None:
    image = np.linspace(0.0, 1.0, 3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)
    image[0, 0, 0, 0] = np.nan  # left out of the summary, as JSON has no NaN
    logged = encode_for_log(image, max_values=10_000)
    assert logged["data"] is None and logged["truncated"] is True
    assert logged["shape"] == [1, 3, 64, 64] and logged["dtype"] == "float32"
    assert logged["summary"]["min"] > 0.0 and logged["summary"]["max"] == 1.0
    assert json.loads(json.dumps(logged)) == logged  # plain JSON, no NaN
    small = encode_for_log(image[:, :, :2, :2], max_values=10_000)
    assert "truncated" not in small and len(small["data"]) == 12


def test_a_sensitive_tensor_logged_without_data_has_no_summary_either() -> None:
    inputs = {"x": np.arange(20_000, dtype=np.float32).reshape(1, -1)}
    encoded, redacted = redact(inputs, {"x": [("income", 3)]}, max_values=10_000)
    assert redacted == ["income"] and encoded["x"]["data"] is None and "summary" not in encoded["x"]
