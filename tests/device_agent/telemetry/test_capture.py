"""The routine path's capture: what it takes, what it leaves to the general way, and that it loses nothing.

Real bundles and the real ONNX runtime through the serving pipeline; the equivalence with the general
way for plain answers is in ``test_recorder.py`` (``test_the_routine_fast_path_records_exactly_what_record_does``).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from bundles.manifest import Histogram
from device_agent.telemetry import capture
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.capture import LatencyCapture, RoutineCapture
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.windows import COUNTERS_ONLY, BinPlan, WindowAccumulator
from tests.device_agent.telemetry.test_recorder import _record_routine_answers, drain, setup


def expected_histograms(manifest, rows: np.ndarray) -> dict[str, list[int]]:
    out = {}
    for i, hist in enumerate(manifest.drift_baseline.features):
        edges = np.asarray(hist.edges)
        out[hist.name] = np.histogram(np.clip(rows[:, i], edges[0], edges[-1]), bins=edges)[0].tolist()
    return out


def test_answers_that_do_not_fit_the_capture_are_counted_the_general_way(tmp_path: Path) -> None:
    manifest, _, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    rng = np.random.default_rng(2)
    requests = [
        rng.normal(size=(1, 4)).astype(np.float32),  # fits: shapes the capture
        rng.normal(size=(3, 4)).astype(np.float32),  # a batch
        rng.normal(size=(1, 4)).astype(np.float64),  # another dtype (the predictor converts it)
        rng.normal(size=(1, 4)).astype(np.float32),
    ]
    for x in requests:
        assert pipeline.predict("tiny", {"x": x}).source == "local"
    recorder.flush()
    (window,) = drain(buffer).windows
    assert (window["counters"]["requests"], window["counters"]["rows"]) == (4, 6)
    assert window["features"] == expected_histograms(manifest, np.concatenate(requests).astype(np.float32))
    assert sum(window["output"]["label"]) == 6 and sum(window["latency_ms"]["counts"]) == 4


def test_the_routine_path_keeps_copies_so_callers_may_reuse_their_arrays(tmp_path: Path) -> None:
    manifest, _, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    x = np.zeros((1, 4), dtype=np.float32)
    seen = []
    for value in (-4.0, 0.5, 4.0):
        x[:] = value  # the same array, refilled: as a caller with one input buffer does
        pipeline.predict("tiny", {"x": x})
        seen.append(x.copy())
    recorder.flush()
    (window,) = drain(buffer).windows
    assert window["features"] == expected_histograms(manifest, np.concatenate(seen))


def test_routine_answers_are_binned_every_batch_and_when_the_window_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture, "BIN_EVERY_ANSWERS", 16)  # 600 answers: 37 full batches and a remainder
    windows, samples = _record_routine_answers(tmp_path, "slow", fast=False)
    assert _record_routine_answers(tmp_path, "fast", fast=True) == (windows, samples)


def test_concurrent_answers_are_all_counted_while_windows_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture, "BIN_EVERY_ANSWERS", 32)
    manifest, engine, _, _, _, _ = setup(tmp_path, TelemetrySettings())
    buffer = TelemetryBuffer(tmp_path / "concurrent.db", cap_bytes=50_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.05), rng=random.Random(1))
    x = {"x": np.full((1, 4), 0.25, dtype=np.float32)}
    outputs = engine.predict("tiny", x).outputs
    threads, per_thread = 4, 3000
    done = threading.Event()

    def serve() -> None:
        for i in range(per_thread):
            recorder.record_local("tiny", manifest, x, outputs, 0.1 + i % 7)

    def close_windows() -> None:
        while not done.is_set():
            recorder.flush()

    closer = threading.Thread(target=close_windows)
    workers = [threading.Thread(target=serve) for _ in range(threads)]
    closer.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    closer.join()
    recorder.flush()
    batch = buffer.next_batch(max_items=1_000_000, max_bytes=1_000_000_000)
    assert batch is not None and len(batch.windows) > 1  # windows really closed while answers came in
    assert sum(w["counters"]["requests"] for w in batch.windows) == threads * per_thread
    assert sum(sum(w["latency_ms"]["counts"]) for w in batch.windows) == threads * per_thread
    assert sum(sum(w["output"]["label"]) for w in batch.windows) == threads * per_thread


def labelled_plan() -> BinPlan:
    output = Histogram(name="label", edges=(), categories=("a", "b", "c"), freqs=(0.2, 0.3, 0.5))
    return BinPlan(output=output, fixed_rows=frozenset({"x"}))


def test_take_leaves_the_answers_appended_after_it_for_the_next_batch() -> None:
    x = {"x": np.ones((1, 2), dtype=np.float32)}
    columns = RoutineCapture.fitting(labelled_plan(), x, {"label": np.array(["a"], dtype=object)}, lambda _: None)
    assert columns is not None
    for label in ("a", "b", "b"):
        assert columns.add(x, {"label": np.array([label], dtype=object)}, 1.0)
    first = columns.take()
    assert columns.add(x, {"label": np.array(["c"], dtype=object)}, 2.0)
    second = columns.take()
    assert first is not None and second is not None and columns.take() is None
    assert first.label_counts == {"a": 1, "b": 2} and second.label_counts == {"c": 1}
    assert second.latencies_ms.tolist() == [2.0] and second.inputs.tolist() == [[1.0, 1.0]]


def test_labels_given_as_class_indices_count_on_their_category_and_unknown_labels_do_not_count() -> None:
    x = {"x": np.zeros((1, 2), dtype=np.float32)}
    columns = RoutineCapture.fitting(labelled_plan(), x, {"label": np.array([0])}, lambda _: None)
    assert columns is not None
    for label in (np.array([2]), np.array([2]), np.array(["b"], dtype=object), np.array(["zebra"], dtype=object)):
        assert columns.add(x, {"label": label}, 1.0)
    assert not columns.add(x, {"label": np.array([0, 1])}, 1.0)  # two labels: a batch, not taken
    now = dt.datetime.now(dt.timezone.utc)
    window = WindowAccumulator("m", 1, labelled_plan(), now, now)
    batch = columns.take()
    assert batch is not None
    window.bin_routine(batch)
    payload = window.close()
    assert payload["output"]["label"] == [0, 1, 2] and payload["counters"]["requests"] == 4


def test_a_model_whose_features_span_several_tensors_is_not_captured() -> None:
    plan = BinPlan(fixed_rows=frozenset({"x"}), float_outputs=("p",))  # reads an output: a full capture
    out = {"p": np.zeros((1, 3), dtype=np.float32)}
    assert RoutineCapture.fitting(plan, {"x": np.zeros((1, 2)), "y": np.zeros((1, 2))}, out, lambda _: None) is None
    assert RoutineCapture.fitting(plan, {"x": np.zeros((2, 2))}, out, lambda _: None) is None  # first answer a batch
    unfixed = BinPlan(float_outputs=("p",))
    assert RoutineCapture.fitting(unfixed, {"x": np.zeros((1, 2))}, out, lambda _: None) is None  # rows not fixed


def test_a_window_that_reads_no_data_captures_latencies_only_and_leaves_batches_to_the_general_way() -> None:
    capture = RoutineCapture.fitting(COUNTERS_ONLY, {"x": np.zeros((1, 2))}, {}, lambda _: None)
    assert isinstance(capture, LatencyCapture)
    assert capture.add({"x": np.zeros((1, 2))}, {}, 2.5) and capture.add({"x": np.zeros((1, 2))}, {}, 7.0)
    assert not capture.add({"x": np.zeros((3, 2))}, {}, 1.0)  # a batch: its rows are counted the general way
    batch = capture.take()
    assert batch is not None and batch.latencies_ms.tolist() == [2.5, 7.0] and batch.inputs.shape == (2, 0)
    assert capture.take() is None
    now = dt.datetime.now(dt.timezone.utc)
    window = WindowAccumulator("m", 1, COUNTERS_ONLY, now, now)
    window.bin_routine(batch)
    payload = window.close()
    assert (payload["counters"]["requests"], payload["counters"]["rows"], payload["features"]) == (2, 2, {})
    assert sum(payload["latency_ms"]["counts"]) == 2


def test_models_served_in_turn_each_keep_their_own_counts(tmp_path: Path) -> None:
    manifest, engine, _, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    x = {"x": np.full((1, 4), 0.5, dtype=np.float32)}
    outputs = engine.predict("tiny", x).outputs
    for i in range(300):
        recorder.record_local(("fraud", "churn", "fraud")[i % 3], manifest, x, outputs, 1.0)
    recorder.flush()
    requests = {w["model"]: w["counters"]["requests"] for w in drain(buffer).windows}
    assert requests == {"fraud": 200, "churn": 100}
