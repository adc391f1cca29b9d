"""End to end: a real agent whose local model fails is answered by the fleet's inference endpoint.

The agent has no fallback configured in agent.toml; the fleet server's desired state announces its
inference endpoint (``EDGEFLEET_FALLBACK_URL``, here the endpoint on its own loopback port, where a
guessed ``<server_url>/v2`` would not answer), and the agent falls back to it with its own device
token. Then the endpoint goes down (the circuit breaker opens) and comes back (it closes).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles.errors import InferenceError
from bundles.testing import build_bundle_dir, reference_classifier
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.fallback import CLOSED, OPEN
from device_agent.identity import Enrollment
from fleet_server.inference.app import create_inference_app
from tests.fleet_server.conftest import auth
from tests.fleet_server.inference import conftest as inference_fixtures
from tests.fleet_server.inference.conftest import Fleet, configured_for, serve

fleet = inference_fixtures.fleet  # the module-scoped fleet server with published bundles (a fixture)

X = np.random.default_rng(3).uniform(-2, 2, size=(1, 4)).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _announced_fallback(arranged: Fleet, inference_url: str) -> dict[str, Any]:
    """The ``fallback`` section of the device's desired state, as the real fleet server renders it."""
    arranged.settings.fallback_url = f"{inference_url}/v2"
    try:
        response = arranged.client.get("/api/v1/device/desired-state", headers=auth(arranged.device_token))
    finally:
        arranged.settings.fallback_url = None
    assert response.status_code == 200, response.text
    fallback: dict[str, Any] = response.json()["fallback"]
    return fallback


def _agent_with_failing_local_model(tmp_path: Path, arranged: Fleet, server_url: str) -> Agent:
    serving = {"breaker_failures": 2, "breaker_reset_s": 0.3, "cloud_timeout_s": 2.0, "cache_entries": 0}
    config = load_config(environ={}, state_dir=tmp_path / "agent", serving=serving)
    config.ensure_state_dir()
    Enrollment(
        server_url=server_url, device_id=arranged.device_id, access_token=arranged.device_token, status="accepted",
        metadata_url=f"{server_url}/tuf/metadata", targets_url=f"{server_url}/tuf/targets",
    ).save(config.identity_dir, {})  # fmt: skip
    agent = Agent.build(config, follow_pointers=False, telemetry=False)
    build_bundle_dir(tmp_path / "tiny-1", name="tiny", version=1)  # the bytes of the published tiny@1
    agent.engine.load("tiny", tmp_path / "tiny-1", "onnx-fp32")

    def crash(_feeds: Any) -> Any:
        raise RuntimeError("the local runtime crashed")

    agent.engine._active["tiny"].predictor.runtime.run = crash  # noqa: SLF001 - inject the local failure only
    return agent


def test_local_failure_is_answered_by_the_cloud_and_the_breaker_follows_the_endpoint(
    fleet: Fleet,  # noqa: F811 - the fixture above
    tmp_path: Path,
) -> None:
    port = _free_port()
    app = create_inference_app(configured_for(fleet))
    with serve(app, port) as url:
        agent = _agent_with_failing_local_model(tmp_path, fleet, fleet.settings.public_url)
        assert agent.pipeline.config.cloud_url == f"{fleet.settings.public_url}/v2"  # an old server's: a guess
        agent.follow_fallback(_announced_fallback(fleet, url))  # what the daemon does with each desired state
        assert agent.pipeline.config.cloud_url == f"{url}/v2"
        assert agent.pipeline.config.cloud_token == fleet.device_token
        result = agent.predict({"x": X}, model="tiny")
        assert result.source == "cloud"
        assert result.fallback_reason == "local_error"
        np.testing.assert_allclose(result.outputs["logits"], reference_classifier().logits(X), atol=1e-5)
        assert str(result.outputs["label"][0]) == f"c{int(reference_classifier().logits(X).argmax())}"
        assert agent.pipeline.breaker("tiny").state == CLOSED

    for _ in range(2):  # the endpoint is down: transport failures open the breaker
        with pytest.raises(InferenceError, match="cloud"):
            agent.predict({"x": X}, model="tiny")
    assert agent.pipeline.breaker("tiny").state == OPEN
    with pytest.raises(InferenceError, match="circuit breaker open"):
        agent.predict({"x": X}, model="tiny")

    with serve(create_inference_app(configured_for(fleet)), port):
        time.sleep(0.4)  # past breaker_reset_s: the next call is the half-open probe
        assert agent.predict({"x": X}, model="tiny").source == "cloud"
        assert agent.pipeline.breaker("tiny").state == CLOSED
    agent.close()
