"""The cloud endpoint's OpenAI-compatible routes on the tiny Llama's GGUF bundle, and a device falling back to them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bundles.archive import open_bundle
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.httpapi import AgentHttpServer
from device_agent.identity import Enrollment
from fleet_server.inference.app import create_inference_app
from tests.conftest import ConvertedLlm
from tests.fleet_server.conftest import auth
from tests.fleet_server.inference.conftest import Fleet, configured_for, publish_dir, serve

MODEL = "tiny-llm"
HELLO = [{"role": "user", "content": "This program is free software"}]


@pytest.fixture(scope="module")
def llm_bundle(fleet: Fleet, tiny_llm: ConvertedLlm) -> Path:
    manifest, root = open_bundle(tiny_llm.bundle, fleet.work / "tiny-llm")
    publish_dir(fleet.release, root, manifest)
    body = {"device_id": fleet.device_id, "model_name": MODEL, "bundle_version": 1, "pinned": True}
    answer = fleet.client.put("/api/v1/admin/assignments", headers=auth(fleet.admin_key), json=body)
    assert answer.status_code == 200, answer.text
    return root


@pytest.fixture(scope="module")
def cloud(fleet: Fleet, llm_bundle: Path) -> Iterator[str]:
    with serve(create_inference_app(configured_for(fleet))) as url:
        yield url


def _client(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def test_the_cloud_answers_chat_with_the_same_tokens_as_the_device(fleet: Fleet, cloud: str, llm_bundle: Path,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    client = _client(cloud, fleet.device_token)
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    meta = answer.model_extra["edgefleet"]
    assert meta["source"] == "cloud" and meta["version"] == 1 and meta["variant"].startswith("gguf-")
    stream = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
    agent = Agent.from_config(environ={}, state_dir=tmp_path / "device", telemetry={"sample_rate": 1.0})
    agent.engine.load(MODEL, llm_bundle, meta["variant"])
    server = AgentHttpServer(agent, "127.0.0.1", 0).start()
    try:
        local = _client(server.url, "unused").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12,
                                                                      temperature=0)  # fmt: skip
        assert local.choices[0].message.content == answer.choices[0].message.content
    finally:
        server.stop()
        agent.close()


def test_completions_and_model_list(fleet: Fleet, cloud: str) -> None:
    client = _client(cloud, fleet.device_token)
    answer = client.completions.create(model=MODEL, prompt="The licence", max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
    assert MODEL in [m.id for m in client.models.list().data]


def test_the_cloud_refuses_bad_requests_with_openai_errors(fleet: Fleet, cloud: str) -> None:
    headers = {"Authorization": f"Bearer {fleet.device_token}"}
    bad = httpx.post(f"{cloud}/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": []}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    onnx = httpx.post(f"{cloud}/v1/chat/completions", headers=headers, json={"model": "tiny", "messages": HELLO},
                      timeout=30)  # fmt: skip
    assert onnx.status_code == 400 and "not a language model" in onnx.json()["error"]["message"]
    nobody = httpx.post(f"{cloud}/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, timeout=30)
    assert nobody.status_code == 401 and nobody.json()["error"]["type"] == "invalid_request_error"
    other = httpx.post(f"{cloud}/v1/chat/completions", headers={"Authorization": f"Bearer {fleet.other_device_token}"},
                       json={"model": MODEL, "messages": HELLO}, timeout=30)  # fmt: skip
    assert other.status_code in (403, 404)


def test_an_enrolled_device_without_its_model_falls_back_to_its_fleets_endpoint(fleet: Fleet, cloud: str,
                                                                                tmp_path: Path) -> None:  # fmt: skip
    config = load_config(environ={}, state_dir=tmp_path / "agent")
    config.ensure_state_dir()
    Enrollment(
        server_url=cloud, device_id=fleet.device_id, access_token=fleet.device_token, status="accepted",
        metadata_url=f"{cloud}/tuf/metadata", targets_url=f"{cloud}/tuf/targets",
    ).save(config.identity_dir, {})  # fmt: skip
    agent = Agent.build(config, follow_pointers=False, telemetry=False)
    server = AgentHttpServer(agent, "127.0.0.1", 0).start()
    try:
        client = _client(server.url, "unused")
        answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
        meta = answer.model_extra["edgefleet"]
        assert (meta["source"], meta["fallback_reason"], meta["version"]) == ("cloud", "not_ready", 1)
        chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                                     stream=True))  # fmt: skip
        assert all(c.model_extra["edgefleet"]["source"] == "cloud" for c in chunks)
    finally:
        server.stop()
        agent.close()
