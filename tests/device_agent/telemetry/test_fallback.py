"""The serving pipeline's fallback policy and chain, with real ONNX models and a real OIP endpoint.

The local engine is the agent's real ``LocalEngine`` on real bundles; :class:`FaultyEngine` only
adds the faults a device meets (a crashing or stalled runtime) around it. The cloud is a real OIP
v2 server on loopback running the v2 model; a dead cloud is a loopback port nobody listens on.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bundles.errors import InferenceError, InputError
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from device_agent.fallback import CircuitBreaker, OipClient
from device_agent.inference import LocalEngine
from device_agent.serving import ServingConfig, ServingPipeline
from tests.device_agent.telemetry.conftest import make_bundle
from tests.device_agent.telemetry.oip_server import OipServer

X = {"x": np.array([[0.5, -1.0, 1.5, 0.25]], dtype=np.float32)}
Y = {"x": np.array([[-1.5, 1.0, 0.0, 2.0]], dtype=np.float32)}


class FaultyEngine:
    """The real engine, plus a switch to make its runtime crash or stall (until released)."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.crash = False
        self.stall = threading.Event()
        self.release = threading.Event()

    def ready(self, model: str) -> bool:
        return self.engine.ready(model)

    def predict(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> Any:
        if self.crash:
            raise InferenceError("onnxruntime: RUNTIME_EXCEPTION in node Gemm")
        if self.stall.is_set():
            self.release.wait(10)
        return self.engine.predict(model, inputs, timeout_s)

    def active_manifest(self, model: str) -> Manifest | None:
        return self.engine.active_manifest(model)

    def previous_predictor(self, model: str) -> Any:
        return self.engine.previous_predictor(model)


def engine_with(*bundle_dirs: Path) -> FaultyEngine:
    engine = LocalEngine()
    for bundle_dir in bundle_dirs:
        engine.load("tiny", bundle_dir, "onnx-fp32")
    return FaultyEngine(engine)


def dead_url() -> str:
    """A loopback URL on which nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v2"


def cloud_label(predictor: Predictor, inputs: dict[str, np.ndarray]) -> str:
    return str(predictor.predict(inputs).outputs["label"][0])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_answer_says_it_came_from_the_local_model(bundle_v1: Path) -> None:
    engine = engine_with(bundle_v1)
    result = ServingPipeline(engine).predict("tiny", X)
    expected = engine.engine.predict("tiny", X).outputs["label"]
    assert (result.source, result.version, result.fallback_reason) == ("local", 1, None)
    assert list(result.outputs["label"]) == list(expected)


def test_local_error_falls_back_to_the_cloud(bundle_v1: Path, cloud: OipServer, cloud_predictor: Predictor) -> None:
    engine = engine_with(bundle_v1)
    engine.crash = True
    pipeline = ServingPipeline(engine, ServingConfig(cloud_url=cloud.url))
    result = pipeline.predict("tiny", X)
    assert (result.source, result.fallback_reason, result.version) == ("cloud", "local_error", None)
    assert str(result.outputs["label"][0]) == cloud_label(cloud_predictor, X)  # raw cloud logits post-processed here
    assert cloud.requests == 1


def test_missed_deadline_falls_back_to_the_cloud(tmp_path: Path, cloud: OipServer) -> None:
    make_bundle(tmp_path, 1, seed=1, deadline_ms=30.0)
    engine = engine_with(tmp_path)
    engine.stall.set()
    try:
        result = ServingPipeline(engine, ServingConfig(cloud_url=cloud.url)).predict("tiny", X)
    finally:
        engine.release.set()
    assert (result.source, result.fallback_reason) == ("cloud", "deadline")
    assert result.latency_ms < 5000


def test_no_local_model_falls_back_to_the_cloud(cloud: OipServer, cloud_predictor: Predictor) -> None:
    pipeline = ServingPipeline(FaultyEngine(LocalEngine()), ServingConfig(cloud_url=cloud.url))
    result = pipeline.predict("tiny", X)
    assert (result.source, result.fallback_reason) == ("cloud", "not_ready")
    assert result.outputs["logits"].shape == (1, 3)  # no manifest on the device: the cloud's raw outputs
    np.testing.assert_allclose(result.outputs["logits"], cloud_predictor.run_model(X)["logits"], rtol=1e-6)


def test_low_confidence_falls_back_and_keeps_the_local_answer_when_the_cloud_is_dead(
    tmp_path: Path, cloud: OipServer
) -> None:
    make_bundle(tmp_path, 1, seed=1, confidence_threshold=0.99)
    engine = engine_with(tmp_path)
    local = engine.engine.predict("tiny", X)
    assert float(local.outputs["probabilities"].max()) < 0.99  # this input is not confident locally

    result = ServingPipeline(engine, ServingConfig(cloud_url=cloud.url)).predict("tiny", X)
    assert (result.source, result.fallback_reason) == ("cloud", "low_confidence")
    assert result.confidence == pytest.approx(float(local.outputs["probabilities"].max()), rel=1e-5)

    offline = ServingPipeline(engine, ServingConfig(cloud_url=dead_url())).predict("tiny", X)
    assert (offline.source, offline.fallback_reason) == ("local", "low_confidence")
    assert list(offline.outputs["label"]) == list(local.outputs["label"])


def test_confident_answers_stay_local(tmp_path: Path, cloud: OipServer) -> None:
    make_bundle(tmp_path, 1, seed=1, confidence_threshold=0.01)
    result = ServingPipeline(engine_with(tmp_path), ServingConfig(cloud_url=cloud.url)).predict("tiny", X)
    assert (result.source, result.fallback_reason) == ("local", None)
    assert cloud.requests == 0


def test_a_failing_cloud_opens_the_breaker_and_a_half_open_probe_closes_it(bundle_v1: Path, cloud: OipServer) -> None:
    clock = FakeClock()
    engine = engine_with(bundle_v1)
    engine.crash = True
    config = ServingConfig(cloud_url=cloud.url, breaker_failures=3, breaker_reset_s=30.0)
    pipeline = ServingPipeline(engine, config, clock=clock)
    cloud.fail_with = 503

    sources = [pipeline.predict("tiny", X).source for _ in range(5)]
    assert sources == ["static"] * 5
    assert cloud.requests == 3  # the breaker opened after three failures: requests 4 and 5 skip the cloud
    assert pipeline.breaker("tiny").state == "open"

    clock.now += 31.0  # half-open: one probe goes out, fails, the breaker opens again
    pipeline.predict("tiny", X)
    assert cloud.requests == 4 and pipeline.breaker("tiny").state == "open"
    pipeline.predict("tiny", X)
    assert cloud.requests == 4

    cloud.fail_with = None
    clock.now += 31.0  # the next probe succeeds and closes the breaker
    assert pipeline.predict("tiny", X).source == "cloud"
    assert pipeline.breaker("tiny").state == "closed" and cloud.requests == 5


def test_a_cloud_that_refuses_the_inputs_is_the_clients_error_and_never_opens_the_breaker(cloud: OipServer) -> None:
    """Nothing local could check the inputs: the cloud's 400 is the answer (an InputError, HTTP 400), not a 503."""
    pipeline = ServingPipeline(FaultyEngine(LocalEngine()), ServingConfig(cloud_url=cloud.url, breaker_failures=2))
    cloud.fail_with = 400
    try:
        for _ in range(3):
            with pytest.raises(InputError, match="the cloud refused the inputs"):
                pipeline.predict("tiny", X)
        assert (pipeline.breaker("tiny").state, pipeline.breaker("tiny").failures) == ("closed", 0)
    finally:
        cloud.fail_with = None


def test_a_cloud_refusal_after_a_low_confidence_answer_keeps_the_local_answer(tmp_path: Path, cloud: OipServer) -> None:
    """The local model took these inputs: the cloud disagreeing about them is no reason to refuse the client."""
    make_bundle(tmp_path, 1, seed=1, confidence_threshold=0.99)
    cloud.fail_with = 400
    try:
        result = ServingPipeline(engine_with(tmp_path), ServingConfig(cloud_url=cloud.url)).predict("tiny", X)
    finally:
        cloud.fail_with = None
    assert (result.source, result.fallback_reason) == ("local", "low_confidence")


def test_a_cloud_that_does_not_serve_the_model_lets_the_chain_go_on(bundle_v1: Path, cloud: OipServer) -> None:
    """A 404 (or 401/403) says the cloud cannot serve this device or model, not that the inputs are wrong."""
    engine = engine_with(bundle_v1)
    engine.crash = True
    cloud.fail_with = 404
    try:
        result = ServingPipeline(engine, ServingConfig(cloud_url=cloud.url)).predict("tiny", X)
    finally:
        cloud.fail_with = None
    assert result.source == "static"


def test_half_open_lets_a_single_probe_through_at_a_time() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_s=10.0, clock=clock)
    breaker.failure()
    assert not breaker.allow()
    clock.now += 10.0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # a second caller while the probe is out
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_the_whole_chain_offline_previous_then_cache_then_static_then_a_clear_error(
    bundle_v1: Path, bundle_v2: Path, tmp_path: Path
) -> None:
    config = ServingConfig(cloud_url=dead_url())

    both = engine_with(bundle_v1, bundle_v2)  # v2 active, v1 kept as previous
    both.crash = True
    answer = ServingPipeline(both, config).predict("tiny", X)
    assert (answer.source, answer.version, answer.fallback_reason) == ("previous", 1, "local_error")

    only_v2 = engine_with(bundle_v2)
    pipeline = ServingPipeline(only_v2, config)
    before = pipeline.predict("tiny", X)
    only_v2.crash = True
    cached = pipeline.predict("tiny", X)
    assert (cached.source, cached.version) == ("cache", 2)
    assert list(cached.outputs["label"]) == list(before.outputs["label"])
    static = pipeline.predict("tiny", Y)  # never seen: no cached answer
    assert (static.source, list(static.outputs["label"])) == ("static", ["unknown"])

    make_bundle(tmp_path, 3, seed=3)  # no static answer declared
    bare = engine_with(tmp_path)
    bare.crash = True
    with pytest.raises(InferenceError) as caught:
        ServingPipeline(bare, config).predict("tiny", Y)
    message = str(caught.value)
    for step in ("local_error", "cloud:", "previous:", "cache:", "static:"):
        assert step in message


def test_nondeterministic_bundles_are_never_answered_from_the_cache(tmp_path: Path) -> None:
    make_bundle(tmp_path, 1, seed=1, deterministic=False, static_answer={"label": ["unknown"]})
    engine = engine_with(tmp_path)
    pipeline = ServingPipeline(engine, ServingConfig(cloud_url=dead_url()))
    pipeline.predict("tiny", X)
    engine.crash = True
    assert pipeline.predict("tiny", X).source == "static"
    assert len(pipeline.cache) == 0


def test_bad_input_is_the_callers_error_not_a_fallback(bundle_v1: Path, cloud: OipServer) -> None:
    pipeline = ServingPipeline(engine_with(bundle_v1), ServingConfig(cloud_url=cloud.url))
    with pytest.raises(InputError):
        pipeline.predict("tiny", {"x": np.zeros((1, 7), dtype=np.float32)})
    assert cloud.requests == 0


def test_oip_client_reports_the_servers_error_text(cloud: OipServer) -> None:
    client = OipClient(cloud.url)
    with pytest.raises(InferenceError, match="unknown model nosuch"):
        client.infer("nosuch", X)
    assert client.ready("tiny") and not client.ready("nosuch")
    client.close()


class PipelineAgent:
    """What the agent's HTTP API needs from an agent for inference: ``predict(inputs, model)``."""

    def __init__(self, pipeline: ServingPipeline) -> None:
        self.pipeline = pipeline

    def predict(self, inputs: dict[str, np.ndarray], model: str | None = None) -> Any:
        return self.pipeline.predict(model or "tiny", inputs)


def test_another_agents_localhost_oip_server_can_be_the_fallback(bundle_v1: Path, bundle_v2: Path) -> None:
    from device_agent.httpapi import AgentHttpServer

    other = engine_with(bundle_v2)
    server = AgentHttpServer(PipelineAgent(ServingPipeline(other)), port=0).start()
    try:
        engine = engine_with(bundle_v1)
        engine.crash = True
        result = ServingPipeline(engine, ServingConfig(cloud_url=server.url + "/v2")).predict("tiny", X)
    finally:
        server.stop()
    assert (result.source, result.fallback_reason) == ("cloud", "local_error")
    assert list(result.outputs["label"]) == list(other.engine.predict("tiny", X).outputs["label"])


def test_inputs_over_the_cache_size_limit_are_not_hashed_or_cached(bundle_v1: Path) -> None:
    engine = engine_with(bundle_v1)
    pipeline = ServingPipeline(engine, ServingConfig(cloud_url=dead_url(), cache_max_input_bytes=8))
    pipeline.predict("tiny", X)  # 16 bytes of input
    engine.crash = True
    assert pipeline.predict("tiny", X).source == "static" and len(pipeline.cache) == 0


def test_large_inputs_use_the_binary_tensor_extension_with_the_agents_server(tmp_path: Path) -> None:
    from device_agent.fallback import binary_request
    from device_agent.httpapi import AgentHttpServer

    make_bundle(tmp_path / "wide", 1, seed=4, n_features=4096)
    other = engine_with(tmp_path / "wide")
    x = {"x": np.random.default_rng(0).uniform(-2, 2, (1, 4096)).astype(np.float32)}  # 16 KiB: binary
    body, headers = binary_request(x)
    assert int(headers["Inference-Header-Content-Length"]) + x["x"].nbytes == len(body)
    seen: list[httpx.Response] = []
    server = AgentHttpServer(PipelineAgent(ServingPipeline(other)), port=0).start()
    try:
        with httpx.Client(event_hooks={"response": [seen.append]}) as http:
            answer = OipClient(server.url + "/v2", client=http).infer("tiny", x)
            outputs = answer.outputs
    finally:
        server.stop()
    assert "inference-header-content-length" in seen[0].headers  # the answer came back binary too
    expected = other.engine.predict("tiny", x)
    np.testing.assert_array_equal(outputs["logits"], expected.outputs["logits"])  # raw bytes: exact
    assert list(outputs["label"]) == list(expected.outputs["label"])  # strings still come back as JSON
    assert answer.postprocessed and answer.version == 1  # a device's answer is final, like the cloud's
