"""Dynamic batching in the serving pipeline: several requests answered by one model call, each as if alone.

Real tiny ONNX bundles through the real ``LocalEngine`` and the real telemetry recorder; :class:`CountingEngine`
only counts the engine's calls around it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.errors import InputError
from bundles.testing import write_manifest
from device_agent.inference import LocalEngine
from device_agent.serving import DeadlineGuard, ServingConfig, ServingPipeline
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from tests.device_agent.telemetry.conftest import make_bundle

RNG = np.random.default_rng(11)


def rows(n: int, batch: int = 1) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.normal(size=(batch, 4)).astype(np.float32)} for _ in range(n)]


class CountingEngine:
    """The real engine, its model calls counted (``predict``: one request; ``predict_batch``: one call)."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.single_calls = 0
        self.batch_calls: list[int] = []
        self.crash = False

    def ready(self, model: str) -> bool:
        return self.engine.ready(model)

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any:
        self.single_calls += 1
        if self.crash:
            raise RuntimeError("runtime crashed")
        return self.engine.predict(model, inputs, timeout_s)

    def predict_batch(self, model: str, batch: list[dict[str, np.ndarray]]) -> list[Any]:
        self.batch_calls.append(len(batch))
        if self.crash:
            raise RuntimeError("runtime crashed")
        return self.engine.predict_batch(model, batch)

    def active_manifest(self, model: str) -> Any:
        return self.engine.active_manifest(model)

    def previous_predictor(self, model: str) -> Any:
        return self.engine.previous_predictor(model)


def engine_for(root: Path, dim_ranges: dict[str, tuple[int, int]] | None = None, **runtime: Any) -> CountingEngine:
    manifest = make_bundle(root, 1, seed=1, static_answer={"label": ["unknown"]}, **runtime)
    if dim_ranges is not None:
        inputs = tuple(dataclasses.replace(t, dim_ranges=dim_ranges) for t in manifest.inputs)
        write_manifest(root, dataclasses.replace(manifest, inputs=inputs))
    engine = LocalEngine()
    engine.load("tiny", root, "onnx-fp32")
    return CountingEngine(engine)


def run_inline(pipeline: ServingPipeline) -> DeadlineGuard:
    """Answer requests one by one until the deadline guard lets the model run inline; its guard."""
    guard = pipeline.deadline_guard("tiny")
    assert guard is not None
    for inputs in rows(guard.MIN_SAMPLES):
        pipeline.predict("tiny", inputs)
    assert guard.inline
    return guard


def test_requests_answered_together_take_one_model_call_and_answer_as_each_would_alone(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine)
    batch = rows(5) + rows(1, batch=3)  # a request of three rows among requests of one
    alone = [pipeline.predict("tiny", inputs) for inputs in batch]
    together = pipeline.predict_together("tiny", batch)
    assert together is not None and engine.batch_calls == [6]
    for one, shared, inputs in zip(alone, together, batch, strict=True):
        assert shared.source == "local" and shared.fallback_reason is None and shared.version == 1
        assert shared.outputs["label"].tolist() == one.outputs["label"].tolist()
        np.testing.assert_allclose(shared.outputs["probabilities"], one.outputs["probabilities"], rtol=1e-5)
        assert shared.outputs["probabilities"].shape[0] == inputs["x"].shape[0]


def test_every_request_answered_together_is_counted_by_telemetry(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", cap_bytes=10_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.0), rng=random.Random(1))
    pipeline = ServingPipeline(engine, recorder=recorder)
    for _ in range(10):
        assert pipeline.predict_together("tiny", rows(7)) is not None
    recorder.flush()
    batch = buffer.next_batch(max_items=1000, max_bytes=10_000_000)
    assert batch is not None
    assert sum(w["counters"]["requests"] for w in batch.windows) == 70
    assert sum(sum(w["latency_ms"]["counts"]) for w in batch.windows) == 70


def test_each_answer_given_together_is_remembered_by_the_result_cache(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine, ServingConfig(cache_entries=16))
    batch = rows(4)
    together = pipeline.predict_together("tiny", batch, inputs_private=True)
    assert together is not None
    engine.crash = True  # the local model fails now: the cache answers identical inputs
    for inputs, first in zip(batch, together, strict=True):
        again = pipeline.predict("tiny", inputs)
        assert again.source == "cache" and again.fallback_reason == "local_error"
        assert again.outputs["label"].tolist() == first.outputs["label"].tolist()


def test_requests_that_cannot_share_a_call_are_left_to_be_answered_alone(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine)
    odd_width = {"x": np.zeros((1, 5), np.float32)}
    odd_dtype = {"x": np.zeros((1, 4), np.float64)}
    other_name = {"y": np.zeros((1, 4), np.float32)}
    for stranger in (odd_width, odd_dtype, other_name):
        assert pipeline.predict_together("tiny", [*rows(2), stranger]) is None
    assert pipeline.predict_together("tiny", rows(1)) is None, "one request is not a batch"
    assert engine.batch_calls == []
    with pytest.raises(InputError):  # alone, the odd request gets its own error; its neighbours their answers
        pipeline.predict("tiny", odd_width)


def test_a_failing_shared_call_leaves_each_request_to_the_fallback_chain_alone(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine)
    engine.crash = True
    batch = rows(3)
    assert pipeline.predict_together("tiny", batch) is None
    answers = pipeline.predict_batch("tiny", batch)  # one by one: each meets the chain (here the static answer)
    assert [(a.source, a.fallback_reason) for a in answers] == [("static", "local_error")] * 3
    assert engine.single_calls == 3


def test_a_confidence_threshold_or_a_deadline_raced_on_its_thread_keeps_requests_apart(tmp_path: Path) -> None:
    thresholded = ServingPipeline(engine_for(tmp_path / "t", deadline_ms=None, confidence_threshold=0.5))
    assert thresholded.predict_together("tiny", rows(3)) is None
    raced = engine_for(tmp_path / "d", deadline_ms=10_000.0)
    pipeline = ServingPipeline(raced, ServingConfig(inline_deadline_margin=0.0))  # never inline: the thread races
    assert pipeline.predict_together("tiny", rows(3)) is None and raced.batch_calls == []


def test_a_deadline_bound_model_runs_together_once_it_runs_inline_and_its_guard_sees_the_shared_call(
    tmp_path: Path,
) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=10_000.0)
    pipeline = ServingPipeline(engine, ServingConfig(inline_deadline_margin=1.0))
    assert pipeline.predict_together("tiny", rows(3)) is None, "raced on its thread at first"
    guard = run_inline(pipeline)
    seen = guard.count
    assert pipeline.predict_together("tiny", rows(3)) is not None and engine.batch_calls == [3]
    assert guard.count == seen + 1


def test_a_shared_call_past_the_deadline_counts_as_a_miss_and_leaves_requests_to_be_answered_alone(
    tmp_path: Path,
) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=10_000.0)
    pipeline = ServingPipeline(engine, ServingConfig(inline_deadline_margin=1.0))
    guard = run_inline(pipeline)
    guard.deadline_s = 1e-9  # every call is late now
    assert pipeline.predict_together("tiny", rows(3)) is None
    assert guard.misses == 1 and not guard.inline


def test_requests_are_cut_into_calls_that_fit_the_models_declared_batch_range(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", dim_ranges={"0": (1, 4)}, deadline_ms=None)
    pipeline = ServingPipeline(engine)
    batch = rows(3) + rows(1, batch=2) + rows(4)  # rows: 1, 1, 1, 2, 1, 1, 1, 1
    together = pipeline.predict_together("tiny", batch)
    assert together is not None and len(together) == len(batch)
    assert engine.batch_calls == [3, 3, 2], "calls of 3, 4 and 2 rows: a fourth row or a fifth would not fit"
    assert [a.outputs["label"].shape[0] for a in together] == [1, 1, 1, 2, 1, 1, 1, 1]
    assert pipeline.predict_together("tiny", [*rows(2), *rows(1, batch=5)]) is None, "a request over the range"


def test_a_model_with_a_fixed_batch_of_one_is_never_answered_together(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine)
    manifest = engine.active_manifest("tiny")
    fixed = dataclasses.replace(manifest, inputs=tuple(dataclasses.replace(t, shape=(1, 4)) for t in manifest.inputs))
    engine.active_manifest = lambda model: fixed  # type: ignore[method-assign]
    assert pipeline.predict_together("tiny", rows(3)) is None and engine.batch_calls == []


def test_the_cache_keeps_a_copy_of_inputs_the_caller_may_reuse(tmp_path: Path) -> None:
    engine = engine_for(tmp_path / "b", deadline_ms=None)
    pipeline = ServingPipeline(engine, ServingConfig(cache_entries=16))
    batch = rows(2)
    kept = batch[0]["x"].copy()
    first = pipeline.predict_together("tiny", batch)
    assert first is not None
    batch[0]["x"][:] = 7.0  # the app reuses its buffer for the next frame
    engine.crash = True
    cached = pipeline.predict("tiny", {"x": kept})
    assert cached.source == "cache" and cached.outputs["label"].tolist() == first[0].outputs["label"].tolist()
