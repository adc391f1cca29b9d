"""A simulated device for server-side telemetry tests: the real agent pipeline, recorder, buffer, uploader.

Predictions run on the real ONNX bundle that the test published; the recorder's clock is set per
request (one request per second from ``start``) so windows land where the test needs them in time.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.inference import LocalEngine
from device_agent.serving import ServingConfig, ServingPipeline
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.uploader import TelemetryUploader


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulate(
    bundle_dir: Path,
    work_dir: Path,
    xs: np.ndarray,
    start: dt.datetime,
    sample_rate: float = 0.0,
    model: str = "tiny",
) -> TelemetryBuffer:
    """Run ``xs`` (one row per request, one request per second from ``start``) through a device."""
    engine = LocalEngine()
    engine.load(model, bundle_dir, "onnx-fp32")
    clock = Clock(start.timestamp())
    buffer = TelemetryBuffer(work_dir / f"telemetry-{uuid.uuid4().hex[:6]}.db", 20_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=sample_rate), clock=clock, rng=random.Random(1))
    pipeline = ServingPipeline(engine, ServingConfig(enforce_deadlines=False), recorder)
    for i, x in enumerate(xs):
        clock.now = start.timestamp() + i
        pipeline.predict(model, {"x": x[None, :].astype(np.float32)})
    recorder.flush()
    return buffer


def upload(buffer: TelemetryBuffer, http: Any, headers: dict[str, str]) -> int:
    """Drain the device buffer into the server; returns the items sent."""
    report = TelemetryUploader(buffer, http, lambda: headers).drain()
    assert buffer.stats()["items"] == 0
    return report.items


def uniform(n: int, seed: int, shift: dict[int, float] | None = None) -> np.ndarray:
    """Rows drawn like the test bundle's training data (U(-2, 2) per feature), some features shifted."""
    xs = np.random.default_rng(seed).uniform(-2.0, 2.0, size=(n, 4))
    for column, delta in (shift or {}).items():
        xs[:, column] += delta
    return xs
