"""The serving pipeline's fast paths keep every behaviour: inline deadline runs and the lazily keyed cache.

Real tiny ONNX bundles through the real ``LocalEngine``; :class:`SlowEngine` only adds a delay (a
model that has become slow) around it, and :class:`Calls` records what the pipeline reports.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bundles.manifest import Manifest
from device_agent.inference import LocalEngine
from device_agent.serving import DeadlineGuard, ServingConfig, ServingPipeline
from device_agent.telemetry.recorder import _forced_reason
from tests.device_agent.telemetry.conftest import make_bundle

X = {"x": np.array([[0.5, -1.0, 1.5, 0.25]], dtype=np.float32)}
Y = {"x": np.array([[-1.5, 1.0, 0.0, 2.0]], dtype=np.float32)}


class SlowEngine:
    """The real engine; ``delay_s`` makes every call that much slower, ``threads`` notes where calls ran."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.delay_s = 0.0
        self.crash = False
        self.threads: list[int] = []

    def ready(self, model: str) -> bool:
        return self.engine.ready(model)

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any:
        self.threads.append(threading.get_ident())
        if self.crash:
            raise RuntimeError("runtime crashed")
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.engine.predict(model, inputs, timeout_s)

    def active_manifest(self, model: str) -> Manifest | None:
        return self.engine.active_manifest(model)

    def previous_predictor(self, model: str) -> Any:
        return self.engine.previous_predictor(model)


class Calls:
    """A recorder that keeps what it is told (the real one is tested in telemetry/test_recorder.py)."""

    def __init__(self) -> None:
        self.records: list[tuple[str | None, str | None]] = []

    def record(self, model: str, manifest: Any, inputs: Any, outputs: Any, source: str | None, latency_ms: float,
               fallback_reason: str | None = None, *rest: Any, **flags: Any) -> None:  # fmt: skip
        self.records.append((source, fallback_reason))


def slow_engine(root: Path, **runtime: object) -> SlowEngine:
    make_bundle(root, 1, seed=1, static_answer={"label": ["unknown"]}, **runtime)
    engine = LocalEngine()
    engine.load("tiny", root, "onnx-fp32")
    return SlowEngine(engine)


def warm_up(pipeline: ServingPipeline, calls: int = DeadlineGuard.MIN_SAMPLES) -> None:
    for _ in range(calls):
        assert pipeline.predict("tiny", X).source == "local"


def test_a_fast_model_runs_inline_once_its_recent_latencies_are_far_below_the_deadline(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)  # deadline 10 s
    pipeline = ServingPipeline(engine)
    warm_up(pipeline)
    guard = pipeline.deadline_guard("tiny")
    assert guard is not None and guard.inline
    engine.threads.clear()
    assert pipeline.predict("tiny", X).source == "local"
    assert engine.threads == [threading.get_ident()], "an inline call runs in the caller's thread"
    pipeline.close()


def test_a_new_model_starts_on_the_worker_thread_path(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)
    pipeline = ServingPipeline(engine)
    pipeline.predict("tiny", X)
    assert engine.threads[0] != threading.get_ident()
    guard = pipeline.deadline_guard("tiny")
    assert guard is not None and not guard.inline
    pipeline.close()


def test_inline_runs_can_be_turned_off(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)
    pipeline = ServingPipeline(engine, ServingConfig(inline_deadline_margin=0.0))
    warm_up(pipeline, 2 * DeadlineGuard.MIN_SAMPLES)
    assert threading.get_ident() not in engine.threads
    pipeline.close()


def test_a_late_inline_answer_is_kept_counted_as_a_deadline_miss_and_the_next_request_can_fall_back(
    tmp_path: Path,
) -> None:
    engine = slow_engine(tmp_path, deadline_ms=300.0)
    calls = Calls()
    pipeline = ServingPipeline(engine, recorder=calls)
    warm_up(pipeline)
    guard = pipeline.deadline_guard("tiny")
    assert guard is not None and guard.inline, "a ~0.1 ms model is far below a 300 ms deadline"

    engine.delay_s = 0.5
    late = pipeline.predict("tiny", Y)
    assert (late.source, late.fallback_reason) == ("local", "deadline"), "the late local answer is returned"
    assert late.latency_ms >= 500
    assert calls.records[-1] == ("local", "deadline")
    assert (guard.inline, guard.misses) == (False, 1)
    assert _forced_reason("local", "deadline", False) == "fallback", "a late answer is always captured"

    abandoned = pipeline.predict("tiny", Y)  # worker path now: abandoned at the deadline, then the chain
    assert (abandoned.source, abandoned.fallback_reason) == ("cache", "deadline"), "the late answer was cached"
    assert abandoned.latency_ms < 500
    assert guard.misses == 2
    pipeline.close()


def test_a_model_that_missed_stays_on_the_worker_thread_path_during_the_cooldown(tmp_path: Path) -> None:
    clock_now = [1000.0]
    engine = slow_engine(tmp_path)
    pipeline = ServingPipeline(engine, ServingConfig(inline_cooldown_s=60.0), clock=lambda: clock_now[0])
    warm_up(pipeline)
    guard = pipeline.deadline_guard("tiny")
    assert guard is not None and guard.inline
    guard.missed()
    warm_up(pipeline, 2 * DeadlineGuard.MIN_SAMPLES)
    assert not guard.inline, "fast again, but still inside the cooldown"
    clock_now[0] += 61.0
    warm_up(pipeline, DeadlineGuard.MIN_SAMPLES)
    assert guard.inline
    pipeline.close()


def test_the_cache_answers_for_the_input_as_it_was_when_answered_even_if_the_caller_reuses_its_array(
    tmp_path: Path,
) -> None:
    engine = slow_engine(tmp_path)
    pipeline = ServingPipeline(engine)
    buffer = X["x"].copy()
    first = pipeline.predict("tiny", {"x": buffer})
    buffer[:] = Y["x"]  # the app reuses its input buffer for the next frame
    engine.crash = True
    assert pipeline.predict("tiny", {"x": buffer}).source == "static", "Y was never answered"
    cached = pipeline.predict("tiny", {"x": X["x"].copy()})
    assert (cached.source, cached.fallback_reason) == ("cache", "local_error")
    assert list(cached.outputs["label"]) == list(first.outputs["label"])
    pipeline.close()


def test_the_cache_keeps_only_its_newest_entries(tmp_path: Path) -> None:
    engine = slow_engine(tmp_path)
    pipeline = ServingPipeline(engine, ServingConfig(cache_entries=4))
    rows = [np.array([[float(i), 0.0, 0.0, 0.0]], dtype=np.float32) for i in range(10)]
    for row in rows:
        pipeline.predict("tiny", {"x": row})
    assert len(pipeline.cache) == 4
    engine.crash = True
    assert pipeline.predict("tiny", {"x": rows[-1]}).source == "cache"
    assert pipeline.predict("tiny", {"x": rows[0]}).source == "static"
    pipeline.close()


def test_telemetry_bins_the_input_as_it_was_answered_even_if_the_caller_reuses_its_array(tmp_path: Path) -> None:
    from device_agent.telemetry.buffer import TelemetryBuffer
    from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings

    engine = slow_engine(tmp_path / "bundle")
    windows = []
    for name, reuse in (("reused", True), ("fresh", False)):
        buffer = TelemetryBuffer(tmp_path / f"{name}.db", cap_bytes=10_000_000)
        recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.0))
        pipeline = ServingPipeline(engine, recorder=recorder)
        frame = X["x"].copy()
        pipeline.predict("tiny", {"x": frame})
        if reuse:
            frame[:] = 4.9  # the next frame lands in the same buffer before the window is binned
        recorder.flush()
        batch = buffer.next_batch(max_items=100, max_bytes=10_000_000)
        assert batch is not None
        windows.append(batch.windows[0]["features"])
        pipeline.close()
    assert windows[0] == windows[1]
