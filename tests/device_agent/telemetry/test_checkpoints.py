"""Open windows survive a process death through their checkpoints; binning runs off the request thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from device_agent.telemetry import capture
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.windows import WindowAccumulator
from tests.device_agent.telemetry.test_recorder import drain, setup


def answers(recorder: TelemetryRecorder, engine, manifest, n: int) -> None:  # noqa: ANN001
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    outputs = engine.predict("tiny", x).outputs
    for _ in range(n):
        recorder.record_local("tiny", manifest, x, outputs, 0.5)


def test_a_window_checkpointed_before_a_crash_is_queued_at_the_next_start(tmp_path: Path) -> None:
    manifest, engine, _, _, _, clock = setup(tmp_path, TelemetrySettings())
    path = tmp_path / "shared.db"
    dying = TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock)
    dying.owner = "another-boot:4242:1:dead"  # what a process that lost power left behind
    answers(dying, engine, manifest, 300)
    assert dying.checkpoint() == 1
    answers(dying, engine, manifest, 50)  # after the last checkpoint: these are what a crash loses
    # the process dies here: no flush, no close

    restarted = TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock)
    assert restarted.recovered == 1
    (window,) = drain(restarted.buffer).windows
    assert window["counters"]["requests"] == 300 and window["model"] == "tiny"


def test_a_window_that_closes_normally_replaces_its_checkpoint_and_counts_once(tmp_path: Path) -> None:
    manifest, engine, _, _, _, clock = setup(tmp_path, TelemetrySettings())
    path = tmp_path / "shared.db"
    recorder = TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock)
    answers(recorder, engine, manifest, 100)
    recorder.checkpoint()
    answers(recorder, engine, manifest, 20)
    recorder.flush()
    assert TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock).recovered == 0
    (window,) = drain(recorder.buffer).windows
    assert window["counters"]["requests"] == 120


def test_a_live_processes_checkpoints_are_left_alone(tmp_path: Path) -> None:
    """An app process and the daemon share telemetry.db: neither takes the other's open windows."""
    manifest, engine, _, _, _, clock = setup(tmp_path, TelemetrySettings())
    path = tmp_path / "shared.db"
    daemon = TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock)
    answers(daemon, engine, manifest, 10)
    daemon.checkpoint()
    assert TelemetryRecorder(TelemetryBuffer(path, 10_000_000), TelemetrySettings(), clock).recovered == 0


def test_binning_runs_on_the_telemetry_thread_not_the_request_thread(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(capture, "BIN_EVERY_ANSWERS", 64)
    manifest, engine, _, _, buffer, _ = setup(tmp_path, TelemetrySettings())
    threads: set[str] = set()
    original = WindowAccumulator.bin_routine

    def spy(self: WindowAccumulator, batch: object) -> None:
        threads.add(threading.current_thread().name)
        original(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(WindowAccumulator, "bin_routine", spy)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(bin_interval_s=0.05)).start()
    try:
        answers(recorder, engine, manifest, 1000)
        time.sleep(0.3)
    finally:
        recorder.stop()
    assert threads == {"edgefleet-telemetry"}
    recorder.flush()
    (window,) = drain(buffer).windows
    assert window["counters"]["requests"] == 1000


def test_the_telemetry_thread_checkpoints_on_its_own(tmp_path: Path) -> None:
    manifest, engine, _, _, buffer, _ = setup(tmp_path, TelemetrySettings())
    recorder = TelemetryRecorder(buffer, TelemetrySettings(bin_interval_s=0.05, checkpoint_interval_s=0.1)).start()
    try:
        answers(recorder, engine, manifest, 10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not buffer._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]:
            time.sleep(0.05)
        assert buffer._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 1
    finally:
        recorder.stop()


def test_a_class_histogram_over_a_score_vector_takes_the_fast_path_and_counts_the_same(tmp_path: Path) -> None:
    """The real digits CNN's baseline: class frequencies named after its logits (10 scores per answer).
    Its answers used to take the slow path one by one; they are captured now, with the same counts."""
    import dataclasses
    import random

    from bundles.manifest import Histogram
    from device_agent.telemetry.capture import RoutineCapture
    from device_agent.telemetry.windows import compile_plan

    manifest, engine, _, _, _, clock = setup(tmp_path, TelemetrySettings())
    classes = Histogram("logits", (), ("0", "1", "2"), (0.3, 0.3, 0.4))
    manifest = dataclasses.replace(
        manifest, drift_baseline=dataclasses.replace(manifest.drift_baseline, output=classes)
    )
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    outputs = engine.predict("tiny", x).outputs
    assert RoutineCapture.fitting(compile_plan(manifest), x, outputs, lambda _c: None) is not None
    results = []
    for fast in (False, True):
        buffer = TelemetryBuffer(tmp_path / f"{fast}.db", 10_000_000)
        recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.0), clock, random.Random(1))
        rng = np.random.default_rng(2)
        for _ in range(300):
            x = {"x": rng.normal(0.0, 1.5, size=(1, 4)).astype(np.float32)}
            out = engine.predict("tiny", x).outputs
            if fast:
                recorder.record_local("tiny", manifest, x, out, 0.5)
            else:
                recorder.record("tiny", manifest, x, out, "local", 0.5, None, None, None, False, True)
        recorder.flush()
        (window,) = drain(buffer).windows
        results.append({k: v for k, v in window.items() if k != "id"})
    assert results[0] == results[1]  # (both count no class: see the report of issue 13 on this baseline's name)
    assert results[0]["counters"]["requests"] == 300
