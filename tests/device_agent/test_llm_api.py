"""The agent's OpenAI-compatible routes on the tiny Llama's GGUF bundle, through the official OpenAI client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from bundles.archive import open_bundle
from device_agent.agent import Agent
from device_agent.httpapi import AgentHttpServer
from tests.conftest import ConvertedLlm

MODEL = "tiny-llm"
HELLO = [{"role": "user", "content": "This program is free software"}]


@dataclass
class Served:
    agent: Agent
    server: AgentHttpServer

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def bundle_dir(tiny_llm: ConvertedLlm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, root = open_bundle(tiny_llm.bundle, tmp_path_factory.mktemp("llm-bundle") / "b")
    return root


def _serve(state_dir: Path, bundle_dir: Path | None, **llm: object) -> Served:
    agent = Agent.from_config(environ={}, state_dir=state_dir, max_concurrency=2, max_waiting=2, queue_timeout_s=0.3,
                              llm=dict(llm), telemetry={"sample_rate": 1.0})  # fmt: skip
    if bundle_dir is not None:
        agent.engine.load(MODEL, bundle_dir, "gguf-q4_k_m")
    return Served(agent, AgentHttpServer(agent, "127.0.0.1", 0).start())


@pytest.fixture(scope="module")
def device(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = _serve(tmp_path_factory.mktemp("llm-device"), bundle_dir, redaction="tests.device_agent.redact:digits")
    yield served
    served.server.stop()
    served.agent.close()


def test_chat_answers_locally_with_the_chat_template_and_says_so(device: Served) -> None:
    answer = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 12
    meta = answer.model_extra["edgefleet"]
    assert meta["source"] == "local" and meta["variant"] == "gguf-q4_k_m" and meta["version"] == 1
    assert meta["ttft_ms"] > 0 and meta["fallback_reason"] is None
    runtime = device.agent.engine._active[MODEL].predictor.runtime
    prompt, _ = runtime.chat_prompt(HELLO)
    assert answer.usage.prompt_tokens == len(runtime.tokenize(prompt))  # the template was applied


def test_streamed_chat_is_the_same_greedy_text_as_the_whole_answer(device: Served) -> None:
    whole = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    stream = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                                   stream=True)  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.model_extra["edgefleet"]["source"] == "local" for c in chunks)


def test_completions_stop_at_the_token_limit_with_finish_reason_length(device: Served) -> None:
    answer = device.client.completions.create(model=MODEL, prompt="The licence", max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 5
    assert answer.model_extra["edgefleet"]["stop_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL, "messages": HELLO, "temperature": 5}, 400, "'temperature' must be a number in [0, 2]"),
        ({"model": MODEL}, 400, "'messages' must be a list"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "no images"),
        ({"model": "other", "messages": HELLO}, 404, "model 'other' is not installed"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "the prompt is"),
    ],
)
def test_bad_requests_get_an_openai_error_object(device: Served, body: dict, status: int, message: str) -> None:
    answer = httpx.post(f"{device.server.url}/v1/chat/completions", json=body, timeout=10)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_not_json_and_unknown_routes_are_refused(device: Served) -> None:
    answer = httpx.post(f"{device.server.url}/v1/chat/completions", content=b"{nope", timeout=10)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    assert httpx.post(f"{device.server.url}/v1/embeddings", json={}, timeout=10).status_code == 404
    assert httpx.get(f"{device.server.url}/v1/models", timeout=10).json()["data"][0]["id"] == MODEL


def test_generations_are_counted_and_sampled_through_the_redaction_hook(device: Served) -> None:
    device.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "call 555 1234"}],
                                          max_tokens=4, temperature=0)  # fmt: skip
    recorder = device.agent.recorder
    window = recorder._open[(MODEL, 1)]
    llm = window.accumulator.llm
    assert llm["generations"] >= 1 and llm["completion_tokens"] >= 1 and sum(llm["ttft_ms"]["counts"]) >= 1
    assert set(llm["stop_reasons"]) <= {"stop", "length", "time_limit"}
    from bundles.windows import check_window

    check_window(window.accumulator.close())
    samples = window.sampler.close(window.manifest)
    prompts = [s["inputs"]["prompt"]["data"][0] for s in samples]
    assert prompts and all("555" not in p for p in prompts)
    assert any("call ### ####" in p for p in prompts)


def test_a_busy_device_answers_through_the_cloud_and_says_why(bundle_dir: Path, tmp_path: Path) -> None:
    cloud = _serve(tmp_path / "cloud", bundle_dir)  # the same OpenAI routes, as the cloud endpoint serves them
    device = _serve(tmp_path / "device", bundle_dir, cloud_url=cloud.server.url)
    try:
        runtime = device.agent.engine._active[MODEL].predictor.runtime
        with runtime._lock:  # the one llama.cpp context is generating for someone else
            answer = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
            stream = list(device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                                                temperature=0, stream=True))  # fmt: skip
        meta = answer.model_extra["edgefleet"]
        assert meta["source"] == "cloud" and meta["fallback_reason"] == "busy" and answer.choices[0].message.content
        assert all(c.model_extra["edgefleet"]["source"] == "cloud" for c in stream)
        local = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
        assert local.model_extra["edgefleet"]["source"] == "local"
        assert local.choices[0].message.content == answer.choices[0].message.content  # same bundle, greedy
    finally:
        for served in (device, cloud):
            served.server.stop()
            served.agent.close()


def test_a_device_without_its_model_falls_back_or_says_why_not(bundle_dir: Path, tmp_path: Path) -> None:
    cloud = _serve(tmp_path / "cloud", bundle_dir)
    empty = _serve(tmp_path / "empty", None, cloud_url=cloud.server.url)
    alone = _serve(tmp_path / "alone", None)
    try:
        answer = empty.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0)
        assert answer.model_extra["edgefleet"]["fallback_reason"] == "not_ready"
        refused = httpx.post(f"{alone.server.url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                             timeout=10)  # fmt: skip
        assert refused.status_code == 503 and "no cloud endpoint is configured" in refused.json()["error"]["message"]
    finally:
        for served in (empty, alone, cloud):
            served.server.stop()
            served.agent.close()


def test_a_request_the_cloud_refuses_is_the_clients_error_not_a_503(bundle_dir: Path, tmp_path: Path) -> None:
    """The device has no local model, so no limits to check: the cloud's 400 comes back as a 400 (it was a 503)."""
    cloud = _serve(tmp_path / "cloud", bundle_dir, max_prompt_tokens=2)
    empty = _serve(tmp_path / "empty", None, cloud_url=cloud.server.url)
    try:
        refused = httpx.post(f"{empty.server.url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                             timeout=30)  # fmt: skip
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["type"] == "invalid_request_error", refused.text
        assert "the cloud refused the request" in error["message"] and "prompt" in error["message"]
    finally:
        for served in (empty, cloud):
            served.server.stop()
            served.agent.close()


def test_the_wall_time_limit_ends_a_generation(bundle_dir: Path, tmp_path: Path) -> None:
    served = _serve(tmp_path / "device", bundle_dir, max_generation_s=1e-6)
    try:
        answer = served.client.completions.create(model=MODEL, prompt="The licence", max_tokens=50, temperature=0)
        assert answer.model_extra["edgefleet"]["stop_reason"] == "time_limit"
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 1
    finally:
        served.server.stop()
        served.agent.close()


def test_concurrent_requests_queue_for_the_one_context(device: Served) -> None:
    results: list[str] = []

    def ask() -> None:
        answer = device.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
        results.append(answer.choices[0].message.content or "")

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
