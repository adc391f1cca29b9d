"""Aggregate drift features (``x.mean``, ``x.std``, ``x.min``, ``x.max``) on image inputs.

The converter declares them for image-like inputs (``converter.bundle_build._summaries``, used here
so that the device reads exactly what the workstation writes). The device must bin each sample's
statistic over its whole tensor, not the tensor's first pixel: real scikit-learn digits, a real
bundle served by the real engine and recorder, PSI computed with the fleet server's own function.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bundles.manifest import Manifest
from bundles.testing import build_bundle_dir, write_manifest
from converter.bundle_build import _summaries
from device_agent.inference import LocalEngine
from device_agent.serving import ServingPipeline
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.windows import WindowAccumulator, compile_plan
from fleet_server.telemetry.aggregate import psi

AGGREGATES = ("x.mean", "x.std", "x.max")
"""The aggregates the converter keeps for digits (``x.min`` is 0 on every image: constant, so dropped)."""


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images = load_digits().images.reshape(-1, 64).astype(np.float32) / 16.0
    return np.random.default_rng(0).permutation(images)


def aggregate_manifest(root: Path, reference: np.ndarray) -> Manifest:
    """A digits-sized bundle whose only drift features are the converter's aggregates of ``x``."""
    manifest = build_bundle_dir(root, name="digits", n_features=64, n_classes=10)
    features, histograms = _summaries("x", reference)
    assert {f.name for f in features} == set(AGGREGATES) and all("aggregate" in f.extra for f in features)
    assert all(f.index == 0 for f in features), "the first pixel is what a plain feature would have read"
    baseline = dataclasses.replace(manifest.drift_baseline, features=tuple(histograms))
    manifest = dataclasses.replace(manifest, features=tuple(features), drift_baseline=baseline)
    write_manifest(root, manifest)
    return manifest


def window_of(manifest: Manifest, rows: np.ndarray) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    accumulator = WindowAccumulator("digits", 1, compile_plan(manifest), now, now)
    for row in rows:
        accumulator.observe({"x": row[None, :]}, None, "local", 1.0, None)
    return accumulator.close()


def psi_of(manifest: Manifest, window: dict[str, Any]) -> dict[str, float]:
    baseline = {h.name: h.freqs for h in manifest.drift_baseline.features}
    values = {name: psi(window["features"][name], baseline[name]) for name in AGGREGATES}
    assert all(v is not None for v in values.values())
    return {name: float(v) for name, v in values.items() if v is not None}


def test_aggregates_are_binned_from_each_samples_statistic_not_from_an_element(
    tmp_path: Path, digits: np.ndarray
) -> None:
    manifest = aggregate_manifest(tmp_path, digits[:900])
    live = digits[900:1100]
    window = window_of(manifest, live)
    for hist in manifest.drift_baseline.features:
        stat = {"x.mean": live.mean(1), "x.std": live.std(1), "x.min": live.min(1), "x.max": live.max(1)}[hist.name]
        clipped = np.clip(stat.astype(np.float64), hist.edges[0], hist.edges[-1])
        expected, _ = np.histogram(clipped, bins=np.asarray(hist.edges))
        assert window["features"][hist.name] == expected.tolist(), hist.name
    assert "x_0" not in window["features"] and window["counters"]["violations"]["input_out_of_range"] == 0


def test_unshifted_digits_stay_under_the_warn_level(tmp_path: Path, digits: np.ndarray) -> None:
    manifest = aggregate_manifest(tmp_path, digits[:900])
    values = psi_of(manifest, window_of(manifest, digits[900:]))
    assert max(values.values()) < 0.1, values


@pytest.mark.parametrize(
    ("shift", "drifted"),
    [
        (lambda x: 1.0 - x, ("x.mean",)),  # inverted images (same std, max still 1)
        (lambda x: np.clip(x + 0.35, 0.0, 1.0), ("x.mean", "x.std")),  # brighter sensor
        (lambda x: x * 0.5, ("x.mean", "x.std")),  # lower contrast (x.max: ~all baseline images max out at 1)
    ],
    ids=["inverted", "brighter", "low-contrast"],
)
def test_shifted_digits_go_above_the_alert_level(
    tmp_path: Path, digits: np.ndarray, shift: Any, drifted: tuple[str, ...]
) -> None:
    manifest = aggregate_manifest(tmp_path, digits[:900])
    values = psi_of(manifest, window_of(manifest, shift(digits[900:]).astype(np.float32)))
    for name in drifted:
        assert values[name] > 0.25, (name, values)


def test_the_recorder_uploads_aggregate_histograms_of_served_images(tmp_path: Path, digits: np.ndarray) -> None:
    manifest = aggregate_manifest(tmp_path / "bundle", digits[:900])
    engine = LocalEngine()
    engine.load("digits", tmp_path / "bundle", "onnx-fp32")
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", cap_bytes=10_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(), clock=lambda: 1_800_000_000.0, rng=random.Random(3))
    pipeline = ServingPipeline(engine, recorder=recorder)  # a fixed clock: all 300 requests in one window
    for row in 1.0 - digits[900:1200]:
        assert pipeline.predict("digits", {"x": row[None, :].astype(np.float32)}).source == "local"
    recorder.flush()
    batch = buffer.next_batch(max_items=10_000, max_bytes=100_000_000)
    assert batch is not None
    windows = batch.windows
    assert len(windows) == 1 and windows[0]["counters"]["requests"] == 300
    assert psi_of(manifest, windows[0])["x.mean"] > 0.25
    pipeline.close()
