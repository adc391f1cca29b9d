"""Aggregation of stored telemetry: per version, per device, fleet-wide; percentiles; samples; Parquet; retention.

Windows are made by the device's own ``WindowAccumulator`` (the code that produces them on a device)
from known observations, posted through the real intake endpoint, then read back through the API.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from device_agent.telemetry.windows import BinPlan, WindowAccumulator
from fleet_server.db import session_scope
from fleet_server.telemetry import query
from fleet_server.telemetry.aggregate import latency_percentile, merge_windows, psi

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
X = {"x": np.zeros((1, 4), dtype=np.float32)}


def window(version: int, latencies_ms, sources, start: dt.datetime, reason: str = "local_error") -> dict:
    acc = WindowAccumulator("digits", version, BinPlan(), start, start + dt.timedelta(minutes=1))
    for latency, source in zip(latencies_ms, sources, strict=True):
        acc.observe(X, None, source, float(latency), None if source == "local" else reason)
    return acc.close()


def sample(version: int, reason: str, at: dt.datetime, probability: float) -> dict:
    return {"id": uuid.uuid4().hex, "at": at.isoformat(), "model": "digits", "version": version, "source": "local",
            "capture_reason": reason, "inclusion_probability": probability,
            "inputs": {"x": {"dtype": "float32", "shape": [1, 2], "data": [0.5, None]}},
            "outputs": {"label": {"dtype": "string", "shape": [1], "data": ["7"]}}, "redacted": ["f1"],
            "latency_ms": 1.5, "fallback_reason": None, "error": None, "confidence": 0.9}  # fmt: skip


def post(client, device, windows=(), samples=(), events=()):
    body = {"batch_id": uuid.uuid4().hex, "events": list(events), "windows": list(windows), "samples": list(samples)}
    response = client.post("/api/v1/device/telemetry", headers=device.headers, json=body)
    assert response.status_code == 200, response.text


def test_latency_percentiles_from_merged_histograms_match_the_raw_values(client, make_device, admin_headers):
    rng = np.random.default_rng(0)
    a, b = make_device(), make_device()
    lat_a, lat_b = rng.lognormal(1.0, 0.5, 3000), rng.lognormal(1.5, 0.4, 2000)
    post(client, a, [window(3, lat_a[:1500], ["local"] * 1500, NOW - dt.timedelta(minutes=9)),
                     window(3, lat_a[1500:], ["local"] * 1500, NOW - dt.timedelta(minutes=8))])  # fmt: skip
    post(client, b, [window(3, lat_b, ["local"] * 2000, NOW - dt.timedelta(minutes=9))])

    (fleet,) = client.get("/api/v1/admin/telemetry/summary", params={"model": "digits", "by": "fleet"},
                          headers=admin_headers).json()  # fmt: skip
    everything = np.concatenate([lat_a, lat_b])
    assert fleet["requests"] == 5000 and fleet["devices_reporting"] == 2
    assert fleet["latency_p95_ms"] == pytest.approx(np.percentile(everything, 95), rel=0.12)
    assert fleet["latency_p99_ms"] == pytest.approx(np.percentile(everything, 99), rel=0.12)


def test_summaries_per_version_and_per_device_with_fallback_and_error_rates(client, make_device, admin_headers):
    a, b = make_device(), make_device()
    t = NOW - dt.timedelta(minutes=5)
    mixed = ["local"] * 40 + ["cloud"] * 10
    post(client, a, [window(2, [1.0] * 100, ["local"] * 100, t), window(3, [2.0] * 50, mixed, t)])
    post(client, b, [window(3, [2.0] * 50, ["local"] * 45 + [None] * 5, t)])

    by_version = client.get("/api/v1/admin/telemetry/summary", params={"model": "digits"}, headers=admin_headers).json()
    v2, v3 = by_version
    assert (v2["version"], v2["requests"], v2["fallback_rate"], v2["devices_reporting"]) == (2, 100, 0.0, 1)
    assert (v3["version"], v3["requests"], v3["fallbacks"], v3["errors"]) == (3, 100, 10, 5)
    assert v3["fallback_rate"] == pytest.approx(0.1) and v3["error_rate"] == pytest.approx(0.05)

    by_device = client.get("/api/v1/admin/telemetry/summary", params={"model": "digits", "by": "device"},
                           headers=admin_headers).json()  # fmt: skip
    assert {(r["device_id"], r["version"], r["requests"]) for r in by_device} == {
        (a.device_id, 2, 100),
        (a.device_id, 3, 50),
        (b.device_id, 3, 50),
    }

    cohort = client.get("/api/v1/admin/telemetry/cohort", headers=admin_headers,
                        params={"model": "digits", "version": 3, "device_id": [a.device_id]}).json()  # fmt: skip
    assert (cohort["requests"], cohort["fallbacks"], cohort["devices_reporting"]) == (50, 10, 1)
    assert (cohort["shadow_agreement"], cohort["shadow_samples"]) == (None, 0)


def test_shadow_agreement_is_summed_over_the_cohort(client, make_device, session_factory):
    a, b = make_device(), make_device()
    for device, agreed in ((a, 9), (b, 6)):
        shadow_window = window(4, [], [], NOW - dt.timedelta(minutes=3))
        shadow_window["shadow"] = {"compared": 10, "agreed": agreed}
        post(client, device, [shadow_window])
    with session_scope(session_factory) as session:
        stats = query.cohort_stats(session, "digits", 4, [a.device_id, b.device_id], NOW - dt.timedelta(hours=1))
    assert (stats.shadow_samples, stats.shadow_agreement, stats.devices_reporting) == (20, 0.75, 2)


def test_windows_merge_by_addition_in_any_grouping():
    start = NOW
    parts = [window(1, [1.0 + i] * 10, ["local"] * 9 + ["cloud"], start) for i in range(4)]
    whole = merge_windows(parts)
    halves = merge_windows([merge_windows(parts[:2]), merge_windows(parts[2:])])
    assert whole == halves
    assert whole["counters"]["requests"] == 40 and whole["counters"]["sources"] == {"local": 36, "cloud": 4}
    assert latency_percentile([0] * 72, 0.5) is None
    assert psi([10, 20, 30], [1 / 6, 2 / 6, 3 / 6]) == pytest.approx(0.0, abs=1e-12)


def test_samples_are_queryable_by_device_version_reason_and_time_and_export_to_parquet(
    client, make_device, admin_headers
):
    a, b = make_device(), make_device()
    post(client, a, samples=[sample(3, "rate", NOW - dt.timedelta(hours=2), 0.01),
                             sample(3, "fallback", NOW - dt.timedelta(minutes=5), 1.0)])  # fmt: skip
    post(client, b, samples=[sample(2, "error", NOW - dt.timedelta(minutes=5), 1.0)])

    def get(**params):
        response = client.get("/api/v1/admin/telemetry/samples", params=params, headers=admin_headers)
        assert response.status_code == 200, response.text
        return response.json()

    assert [s["reason"] for s in get(device_id=a.device_id)] == ["fallback", "rate"]
    assert [s["device_id"] for s in get(version=2)] == [b.device_id]
    assert [s["reason"] for s in get(reason="fallback")] == ["fallback"]
    recent = get(since=(NOW - dt.timedelta(hours=1)).isoformat())
    assert sorted(s["reason"] for s in recent) == ["error", "fallback"]
    assert recent[0]["inputs"]["x"]["data"] == [0.5, None] and recent[0]["redacted"] == ["f1"]

    response = client.get("/api/v1/admin/telemetry/samples.parquet", params={"model": "digits"}, headers=admin_headers)
    table = pq.read_table(io.BytesIO(response.content)).to_pylist()
    assert len(table) == 3
    rate = next(r for r in table if r["reason"] == "rate")
    assert rate["inclusion_probability"] == 0.01 and rate["device_id"] == a.device_id
    assert rate["inputs_json"] == '{"x": {"dtype": "float32", "shape": [1, 2], "data": [0.5, null]}}'


def test_retention_deletes_only_rows_older_than_the_limits(client, make_device, admin_headers, session_factory):
    device = make_device()
    old, new = NOW - dt.timedelta(days=40), NOW - dt.timedelta(days=1)
    post(client, device, windows=[window(1, [1.0], ["local"], old), window(1, [1.0], ["local"], new)],
         samples=[sample(1, "rate", old, 0.01), sample(1, "rate", new, 0.01)],
         events=[{"id": "e", "type": "install", "at": old.isoformat(), "model": "digits", "version": 1}])  # fmt: skip
    response = client.post("/api/v1/admin/telemetry/prune", headers=admin_headers, json={"windows_days": 30})
    assert response.json() == {"metric_windows": 1, "prediction_samples": 1, "device_events": 0}
    with session_scope(session_factory) as session:
        left = query.samples(session, query.SampleFilter(model="digits"))
    assert [s.at.date() for s in left] == [new.date()]


def test_bad_query_parameters_are_400_or_422(client, admin_headers):
    bad = client.get("/api/v1/admin/telemetry/summary", params={"model": "digits", "since": NOW.isoformat(),
                                                                 "until": (NOW - dt.timedelta(hours=1)).isoformat()},
                     headers=admin_headers)  # fmt: skip
    assert bad.status_code == 400 and "before" in bad.json()["detail"]
    grouped = client.get("/api/v1/admin/telemetry/summary", params={"model": "digits", "by": "planet"},
                         headers=admin_headers)  # fmt: skip
    assert grouped.status_code == 422
