"""The Python API and the localhost Open Inference Protocol API, on a real installed bundle."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from bundles.errors import BusyError, ModelNotReadyError
from bundles.testing import golden_inputs, reference_classifier
from device_agent.agent import Agent
from device_agent.httpapi import AgentHttpServer
from device_agent.inference import LocalEngine
from tests.device_agent.helpers import Device, entry


@pytest.fixture
def installed(tmp_path: Path, published: Path) -> Path:
    """A device state dir with tiny@1 committed."""
    device = Device.start(tmp_path / "device", published)
    assert device.updater.deploy(entry("tiny", 1)).status.value == "installed"
    device.engine.close()
    return tmp_path / "device"


@pytest.fixture
def agent(installed: Path) -> Agent:
    a = Agent.from_config(environ={}, state_dir=installed)
    yield a
    a.close()


def test_agent_predict_answers_locally_with_the_reference_outputs(agent: Agent) -> None:
    x = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
    result = agent.predict({"x": x})
    assert result.source == "local" and result.version == 1 and result.model == "tiny"
    expected = reference_classifier(seed=1).logits(x)
    assert int(result.outputs["class_index"][0]) == int(np.argmax(expected[0]))


def test_agent_predict_batch_gives_one_result_per_request(agent: Agent) -> None:
    batch = [{"x": np.full((1, 4), v, dtype=np.float32)} for v in (0.0, 1.0, -1.0)]
    results = agent.predict_batch(batch)
    assert [r.source for r in results] == ["local"] * 3


def test_agent_status_names_the_active_bundle_and_the_queue(agent: Agent) -> None:
    status = agent.status()
    assert status["health"] == "ok"
    assert status["models"]["tiny"]["slots"][0]["state"] == "active"
    assert status["last_update"] is None or status["last_update"]["status"] == "installed"
    assert set(status["queue"]) >= {"running", "waiting", "completed", "rejected"}


def test_app_agent_follows_a_commit_made_by_the_daemon(installed: Path, published: Path) -> None:
    app = Agent.from_config(environ={}, state_dir=installed)
    try:
        assert app.predict({"x": np.zeros((1, 4), np.float32)}).version == 1
        daemon_side = Device.start(installed, published)
        assert daemon_side.updater.deploy(entry("tiny", 2)).status.value == "installed"
        app._checked_at = 0.0  # skip the once-a-second throttle
        assert app.predict({"x": np.zeros((1, 4), np.float32)}).version == 2
    finally:
        app.close()


@pytest.fixture
def server(agent: Agent) -> str:
    srv = AgentHttpServer(agent, "127.0.0.1", 0).start()
    yield srv.url
    srv.stop()


def test_http_health_and_metadata_follow_the_open_inference_protocol(server: str) -> None:
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/v2/models/tiny/ready").json()["ready"] is True
    meta = httpx.get(f"{server}/v2/models/tiny").json()
    assert meta["versions"] == ["1"] and meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    assert "binary_tensor_data" in httpx.get(f"{server}/v2").json()["extensions"]


def test_http_infer_with_json_tensors(server: str, agent: Agent) -> None:
    x = golden_inputs(agent.engine.active_manifest("tiny"))[0]["x"]  # type: ignore[arg-type]
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    body = {"id": "r1", "inputs": [tensor]}
    answer = httpx.post(f"{server}/v2/models/tiny/infer", json=body).json()
    assert answer["id"] == "r1" and answer["model_version"] == "1"
    assert answer["parameters"]["source"] == "local"
    outputs = {o["name"]: o for o in answer["outputs"]}
    direct = agent.predict({"x": x})
    assert outputs["class_index"]["data"] == np.asarray(direct.outputs["class_index"]).ravel().tolist()
    assert outputs["label"]["datatype"] == "BYTES"


def test_http_infer_with_the_binary_tensor_extension(server: str, agent: Agent) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    header = {
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    response = httpx.post(
        f"{server}/v2/models/tiny/infer",
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 200
    n = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:n])
    logits = np.frombuffer(response.content[n:], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
    np.testing.assert_allclose(logits, agent.predict({"x": x}).raw["logits"], rtol=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/tiny/infer", b"not json", 400),
        (
            "/v2/models/tiny/infer",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
            400,
        ),
        ("/v2/models/tiny/infer", json.dumps({"inputs": []}).encode(), 400),
        (
            "/v2/models/nope/infer",
            json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}).encode(),
            404,
        ),
        ("/v2/nothing", b"{}", 404),
    ],
    ids=["bad-json", "wrong-shape", "no-inputs", "unknown-model", "unknown-path"],
)
def test_http_errors_are_json_with_a_clear_status(server: str, path: str, body: bytes, status: int) -> None:
    response = httpx.post(f"{server}{path}", content=body)
    assert response.status_code == status
    assert response.json()["error"]


class _SlowPredictor:
    def __init__(self, gate: threading.Event) -> None:
        self.gate, self.closed = gate, False

    def predict(self, inputs: dict[str, np.ndarray]) -> str:
        self.gate.wait(5)
        return "slow"

    def close(self) -> None:
        self.closed = True


def test_engine_rejects_with_busy_error_when_saturated(installed: Path) -> None:
    engine = LocalEngine(max_concurrency=1, max_waiting=0, queue_timeout_s=0.05)
    from device_agent.slots import ModelSlots

    slots = ModelSlots(installed / "models", "tiny")
    engine.load("tiny", slots.slot_dir(slots.pointer().committed or "a"), "onnx-fp32")
    gate = threading.Event()
    engine._active["tiny"].predictor = _SlowPredictor(gate)
    worker = threading.Thread(target=engine.predict, args=("tiny", {}))
    worker.start()
    for _ in range(200):
        if engine.stats.running == 1:
            break
        threading.Event().wait(0.01)
    with pytest.raises(BusyError, match="busy"):
        engine.predict("tiny", {})
    gate.set()
    worker.join()
    assert engine.stats.rejected == 1 and engine.stats.completed == 1
    with pytest.raises(ModelNotReadyError):
        engine.predict("other", {})


def test_engine_swap_lets_requests_in_flight_finish_on_the_old_predictor(installed: Path) -> None:
    from device_agent.slots import ModelSlots

    slots = ModelSlots(installed / "models", "tiny")
    engine = LocalEngine(max_concurrency=4)
    engine.load("tiny", slots.slot_dir(slots.pointer().committed or "a"), "onnx-fp32")
    gate = threading.Event()
    slow = _SlowPredictor(gate)
    engine._active["tiny"].predictor = slow
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(engine.predict("tiny", {})))
    worker.start()
    for _ in range(200):
        if engine.stats.running == 1:
            break
        threading.Event().wait(0.01)
    other = "b" if slots.pointer().committed == "a" else "a"
    engine.unload("tiny")  # retire while a request is in flight
    assert not slow.closed, "a predictor was closed under a running request"
    gate.set()
    worker.join()
    assert results == ["slow"] and slow.closed
    assert other in ("a", "b")
