"""Metric windows and sampled logs recorded from real predictions through the serving pipeline."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import socket
from pathlib import Path

import numpy as np
import pytest

from bundles.errors import InferenceError
from bundles.manifest import Manifest
from bundles.testing import build_bundle_dir, write_manifest
from device_agent.inference import LocalEngine
from device_agent.serving import ServingConfig, ServingPipeline
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.windows import LATENCY_EDGES_MS
from tests.device_agent.telemetry.test_fallback import FakeClock, FaultyEngine


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v2"


def setup(tmp_path: Path, settings: TelemetrySettings, sensitive: str | None = None, static: bool = True):
    manifest = build_bundle_dir(tmp_path / "bundle", name="tiny", version=4, seed=4)
    features = tuple(dataclasses.replace(f, sensitive=(f.name == sensitive)) for f in manifest.features)
    config = dataclasses.replace(manifest.runtime_config, static_answer={"label": ["unknown"]} if static else None)
    manifest = dataclasses.replace(manifest, features=features, runtime_config=config)
    write_manifest(tmp_path / "bundle", manifest)
    engine = LocalEngine()
    engine.load("tiny", tmp_path / "bundle", "onnx-fp32")
    clock = FakeClock()
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", cap_bytes=10_000_000)
    recorder = TelemetryRecorder(buffer, settings, clock=clock, rng=random.Random(7))
    faulty = FaultyEngine(engine)
    pipeline = ServingPipeline(faulty, ServingConfig(cloud_url=dead_url(), enforce_deadlines=False), recorder=recorder)
    return manifest, faulty, pipeline, recorder, buffer, clock


def drain(buffer: TelemetryBuffer):
    batch = buffer.next_batch(max_items=10_000, max_bytes=100_000_000)
    assert batch is not None
    buffer.ack(batch.batch_id)
    return batch


def test_a_window_counts_requests_and_bins_inputs_on_the_baseline_edges(tmp_path: Path) -> None:
    manifest, _, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    rng = np.random.default_rng(0)
    xs = rng.normal(0.0, 1.2, size=(300, 4)).astype(np.float32)
    labels = [str(pipeline.predict("tiny", {"x": x[None, :]}).outputs["label"][0]) for x in xs]
    recorder.flush()

    (window,) = drain(buffer).windows
    counters = window["counters"]
    assert (counters["requests"], counters["rows"], counters["errors"]) == (300, 300, 0)
    assert counters["sources"] == {"local": 300}
    latency = window["latency_ms"]["counts"]
    assert sum(latency) == 300 and len(latency) == len(LATENCY_EDGES_MS) + 1
    for i, hist in enumerate(manifest.drift_baseline.features):
        edges = np.asarray(hist.edges)
        expected, _ = np.histogram(np.clip(xs[:, i], edges[0], edges[-1]), bins=edges)
        assert window["features"][hist.name] == expected.tolist()
    categories = manifest.drift_baseline.output.categories
    assert window["output"]["label"] == [labels.count(c) for c in categories]
    assert (window["model"], window["version"]) == ("tiny", 4)


def test_windows_close_on_the_wall_clock_and_align_to_the_window_length(tmp_path: Path) -> None:
    _, _, pipeline, recorder, buffer, clock = setup(tmp_path, TelemetrySettings(window_s=60.0, sample_rate=0.0))
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    pipeline.predict("tiny", x)
    clock.now += 60.0
    pipeline.predict("tiny", x)  # the first window closed on this request
    (window,) = drain(buffer).windows
    assert window["start"].endswith(":00+00:00") and window["counters"]["requests"] == 1
    recorder.flush()
    assert drain(buffer).windows[0]["counters"]["requests"] == 1


def test_a_shorter_window_from_the_server_ends_the_current_window_at_its_next_boundary(tmp_path: Path) -> None:
    _, _, pipeline, recorder, buffer, clock = setup(tmp_path, TelemetrySettings(window_s=60.0, sample_rate=0.0))
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    start = clock.now
    pipeline.predict("tiny", x)
    recorder.settings = recorder.settings.with_desired({"window_s": 10})
    clock.now = (start // 10 + 1) * 10  # the next 10 s boundary, well before the 60 s one
    pipeline.predict("tiny", x)  # closes the first window there
    (first,) = drain(buffer).windows
    end = dt.datetime.fromisoformat(first["end"]).timestamp()
    assert first["counters"]["requests"] == 1 and end == clock.now
    clock.now += 10.0
    pipeline.predict("tiny", x)
    (second,) = drain(buffer).windows
    length = dt.datetime.fromisoformat(second["end"]) - dt.datetime.fromisoformat(second["start"])
    assert length == dt.timedelta(seconds=10) and second["counters"]["requests"] == 1


def test_constraint_violations_are_counted(tmp_path: Path) -> None:
    _, _, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    pipeline.predict("tiny", {"x": np.array([[9.0, 0.0, 0.0, 0.0]], dtype=np.float32)})  # f0 max is 5
    pipeline.predict("tiny", {"x": np.array([[np.nan, 0.0, 0.0, 0.0]], dtype=np.float32)})  # NaN in, NaN out
    pipeline.predict("tiny", {"x": np.zeros((1, 4), dtype=np.float32)})
    recorder.flush()
    violations = drain(buffer).windows[0]["counters"]["violations"]
    assert violations["input_out_of_range"] == 2
    assert violations["nan_output"] == 1


def test_without_histograms_a_window_keeps_its_counters_and_latencies_and_no_distributions(tmp_path: Path) -> None:
    _, engine, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0, histograms=False))
    for value in (0.1, 0.2, 0.3):
        pipeline.predict("tiny", {"x": np.full((1, 4), value, dtype=np.float32)})  # the routine way
    pipeline.predict("tiny", {"x": np.zeros((2, 4), dtype=np.float32)})  # a batch: the general way
    engine.crash = True
    assert pipeline.predict("tiny", {"x": np.full((1, 4), 0.1, dtype=np.float32)}).source == "cache"
    recorder.flush()
    (window,) = drain(buffer).windows
    counters = window["counters"]
    assert (counters["requests"], counters["rows"], counters["fallbacks"]) == (5, 6, 1)
    assert counters["sources"] == {"local": 4, "cache": 1} and counters["fallback_reasons"] == {"local_error": 1}
    assert sum(window["latency_ms"]["counts"]) == 5
    assert (window["features"], window["output"]) == ({}, {})


def test_turning_histograms_off_ends_the_open_window_and_loses_no_answer(tmp_path: Path) -> None:
    _, _, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    x = {"x": np.full((1, 4), 0.2, dtype=np.float32)}
    for _ in range(3):
        pipeline.predict("tiny", x)
    recorder.settings = dataclasses.replace(recorder.settings, histograms=False)
    for _ in range(2):
        pipeline.predict("tiny", x)
    recorder.settings = dataclasses.replace(recorder.settings, histograms=True)
    pipeline.predict("tiny", x)
    recorder.flush()
    windows = drain(buffer).windows
    assert [w["counters"]["requests"] for w in windows] == [3, 2, 1]
    assert [sum(sum(h) for h in w["features"].values()) for w in windows] == [12, 0, 4]  # 4 features a row


def test_an_answer_racing_with_turning_histograms_off_or_on_is_counted_in_the_next_window(tmp_path: Path) -> None:
    _, engine, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    x = {"x": np.full((1, 4), 0.2, dtype=np.float32)}
    pipeline.predict("tiny", x)
    late = recorder._routes[("tiny", 4)].capture  # held by a request that found its route before the change
    recorder.settings = dataclasses.replace(recorder.settings, histograms=False)
    assert late(x, engine.predict("tiny", x).outputs, 1.0)  # lands in the retired capture
    pipeline.predict("tiny", x)
    late = recorder._routes[("tiny", 4)].capture  # latencies only, now
    recorder.settings = dataclasses.replace(recorder.settings, histograms=True)
    assert late(x, engine.predict("tiny", x).outputs, 1.0)
    pipeline.predict("tiny", x)
    recorder.flush()
    windows = drain(buffer).windows
    assert [w["counters"]["requests"] for w in windows] == [1, 2, 2]
    assert [sum(sum(h) for h in w["features"].values()) for w in windows] == [4, 0, 4]  # the late one: no row


def test_fallbacks_and_errors_are_always_captured_with_probability_one(tmp_path: Path) -> None:
    _, engine, pipeline, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0), static=False)
    x = {"x": np.full((1, 4), 0.3, dtype=np.float32)}
    pipeline.predict("tiny", x)  # fills the cache
    engine.crash = True
    assert pipeline.predict("tiny", x).source == "cache"
    with pytest.raises(InferenceError):
        pipeline.predict("tiny", {"x": np.full((1, 4), 0.7, dtype=np.float32)})
    recorder.flush()
    batch = drain(buffer)
    reasons = sorted((s["capture_reason"], s["inclusion_probability"], s["source"]) for s in batch.samples)
    assert reasons == [("error", 1.0, None), ("fallback", 1.0, "cache")]
    counters = batch.windows[0]["counters"]
    assert (counters["requests"], counters["errors"], counters["fallbacks"]) == (3, 1, 1)
    assert counters["fallback_reasons"] == {"local_error": 2}
    assert counters["captured"] == {"error": 1, "fallback": 1}


def test_routine_samples_go_through_a_reservoir_and_record_their_inclusion_probability(tmp_path: Path) -> None:
    settings = TelemetrySettings(sample_rate=0.5, reservoir_size=5)
    _, _, pipeline, recorder, buffer, _ = setup(tmp_path, settings)
    rng = np.random.default_rng(1)
    for _ in range(200):
        pipeline.predict("tiny", {"x": rng.normal(size=(1, 4)).astype(np.float32)})
    recorder.flush()
    batch = drain(buffer)
    assert len(batch.samples) == 5
    candidates = batch.windows[0]["counters"]["requests"] * 0.5
    for sample in batch.samples:
        assert sample["capture_reason"] == "rate"
        # 0.5 * 5 / (number of Bernoulli candidates, about 100)
        assert sample["inclusion_probability"] == pytest.approx(0.5 * 5 / candidates, rel=0.3)
        assert sample["inputs"]["x"]["shape"] == [1, 4] and sample["outputs"]["label"]["dtype"] == "string"


def test_sensitive_features_are_redacted_from_samples(tmp_path: Path) -> None:
    settings = TelemetrySettings(sample_rate=1.0, reservoir_size=3)
    _, _, pipeline, recorder, buffer, _ = setup(tmp_path, settings, sensitive="f1")
    pipeline.predict("tiny", {"x": np.array([[0.1, 0.2, 0.3, 0.4], [1.1, 1.2, 1.3, 1.4]], dtype=np.float32)})
    recorder.flush()
    (sample,) = drain(buffer).samples
    assert sample["redacted"] == ["f1"]
    data = sample["inputs"]["x"]["data"]
    assert data[1] is None and data[5] is None
    assert data[0] == pytest.approx(0.1) and data[6] == pytest.approx(1.3)


def test_desired_state_settings_override_the_defaults() -> None:
    settings = TelemetrySettings().with_desired({"window_s": 300, "sample_rate": 0.05, "unknown": 1})
    assert (settings.window_s, settings.sample_rate, settings.reservoir_size) == (300.0, 0.05, 20)


def _manifest_of(path: Path) -> Manifest:
    return Manifest.from_bytes((path / "manifest.json").read_bytes())


def test_shadow_comparisons_are_counted_in_the_candidate_versions_window(tmp_path: Path) -> None:
    manifest, _, _, recorder, buffer, _ = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    candidate = dataclasses.replace(manifest, version=5)
    for i in range(10):
        recorder.record_shadow("tiny", candidate, agreed=i < 7)
    recorder.flush()
    (window,) = drain(buffer).windows
    assert (window["version"], window["counters"]["requests"]) == (5, 0)
    assert window["shadow"] == {"compared": 10, "agreed": 7, "errors": 0, "latency_ms_sum": 0.0}


def _record_routine_answers(tmp_path: Path, name: str, fast: bool) -> tuple[list, list]:
    """Windows and samples (ids dropped) of the same routine answers through record or record_local."""
    manifest, engine, _, _, _, clock = setup(tmp_path / name, TelemetrySettings())
    buffer = TelemetryBuffer(tmp_path / name / "other.db", cap_bytes=10_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.3, reservoir_size=4), clock, random.Random(3))
    rng = np.random.default_rng(5)
    for i in range(600):
        x = {"x": rng.normal(0.0, 1.5, size=(1, 4)).astype(np.float32)}
        outputs = engine.predict("tiny", x).outputs
        if fast:
            recorder.record_local("tiny", manifest, x, outputs, 0.01 * i, confidence=0.75)
        else:
            recorder.record("tiny", manifest, x, outputs, "local", 0.01 * i, None, None, 0.75, False, True)
    recorder.flush()
    batch = drain(buffer)
    return [{**w, "id": None} for w in batch.windows], [{**s, "id": None} for s in batch.samples]


def test_the_routine_fast_path_records_exactly_what_record_does(tmp_path: Path) -> None:
    windows, samples = _record_routine_answers(tmp_path, "slow", fast=False)
    assert _record_routine_answers(tmp_path, "fast", fast=True) == (windows, samples)
    assert windows[0]["counters"]["requests"] == 600 and len(samples) == 4
    assert all(s["confidence"] == 0.75 and s["capture_reason"] == "rate" for s in samples)


def test_replacing_the_pipelines_recorder_sends_routine_answers_to_the_new_one(tmp_path: Path) -> None:
    _, _, pipeline, first, buffer, clock = setup(tmp_path, TelemetrySettings(sample_rate=0.0))
    second = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.0), clock=clock)
    pipeline.recorder = second
    pipeline.predict("tiny", {"x": np.zeros((1, 4), dtype=np.float32)})
    assert first.flush() == 0 and second.flush() == 1
    assert drain(buffer).windows[0]["counters"]["requests"] == 1


def _scores_model(tmp_path: Path, form: str, n_classes: int):
    """A classifier that answers raw scores (no postprocess), read by the manifest's readout in ``form``."""
    from bundles.manifest import Histogram, Readout
    from bundles.testing import OUTPUT_NAME, reference_classifier

    manifest = build_bundle_dir(tmp_path / "bundle", name="scores", version=1, n_classes=n_classes, seed=5)
    classes = tuple(f"c{i}" for i in range(max(2, n_classes)))
    baseline = dataclasses.replace(
        manifest.drift_baseline,
        output=Histogram(OUTPUT_NAME, categories=classes, freqs=(1 / len(classes),) * len(classes)),
    )
    manifest = dataclasses.replace(manifest, postprocess=(), drift_baseline=baseline,
                                   readout=Readout(OUTPUT_NAME, form, classes=classes))  # fmt: skip
    write_manifest(tmp_path / "bundle", manifest)
    engine = LocalEngine()
    engine.load("scores", tmp_path / "bundle", "onnx-fp32")
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", cap_bytes=10_000_000)
    recorder = TelemetryRecorder(buffer, TelemetrySettings(sample_rate=0.0), clock=FakeClock(), rng=random.Random(1))
    config = ServingConfig(cloud_url=dead_url(), enforce_deadlines=False)
    return reference_classifier(4, n_classes, 5), ServingPipeline(engine, config, recorder=recorder), recorder, buffer


@pytest.mark.parametrize(("form", "n_classes"), [("logits", 3), ("binary-logit", 1)])
def test_a_score_output_is_counted_by_the_class_its_readout_decides(tmp_path: Path, form: str, n_classes: int) -> None:
    """The baseline counts classes (argmax, or one logit against 0): so must the device, on both capture paths."""
    from bundles.readout import decide_classes
    from bundles.testing import OUTPUT_NAME

    reference, pipeline, recorder, buffer = _scores_model(tmp_path, form, n_classes)
    xs = np.random.default_rng(3).normal(0.0, 2.0, size=(60, 4)).astype(np.float32)
    for x in xs[:50]:  # batch-1 answers: the routine capture
        pipeline.predict("scores", {"x": x[None, :]})
    pipeline.predict("scores", {"x": xs[50:]})  # a batch: the general way
    recorder.flush()
    (window,) = drain(buffer).windows
    decided = decide_classes(reference.logits(xs), form)
    assert window["output"][OUTPUT_NAME] == np.bincount(decided, minlength=max(2, n_classes)).tolist()
    assert sum(window["output"][OUTPUT_NAME]) == 60
