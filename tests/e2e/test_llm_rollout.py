"""The tiny Llama from registration to a device's chat: published, rolled out, gated on TTFT, answering.

The tiny Llama converted once (``tiny_llm``: f16, q8_0 and q4_k_m, each gated against transformers) is
published with the release workstation's ``edgefleet-convert publish --server`` to the fleet server on
loopback. A real agent process enrolls; a rollout to it, gated on the error rate and the generations'
TTFT p95, directs it to a GGUF variant, which it installs through TUF into an A/B slot, self-tests by
greedy generation from the golden prompts and commits. An application chats with it through the
OpenAI Python client meanwhile (streaming included), and its telemetry (generations, TTFT, tokens/s)
is what the gate reads.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ConvertedLlm
from tests.converter.helpers import ok
from tests.device_agent.e2e_support import Daemon, Fleet, agent_cli, start_daemon
from tests.e2e.test_rollout_real_agents import _device_id, _group, create, drive, wait_until

MODEL = "tiny-llm"
HELLO = [{"role": "user", "content": "This program is free software"}]


class ChatApp:
    """An application on the device: asks for a short greedy chat answer until stopped, keeps the answers."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=30)
        self.stop, self.answers = threading.Event(), []  # type: threading.Event, list[openai.types.chat.ChatCompletion]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
            except openai.APIError:
                time.sleep(0.1)
                continue
            self.answers.append(answer)
            time.sleep(0.02)

    def local(self) -> list[openai.types.chat.ChatCompletion]:
        return [a for a in self.answers if a.model_extra["edgefleet"]["source"] == "local"]


@pytest.fixture(scope="module")
def fleet(tiny_llm: ConvertedLlm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = Fleet(tmp_path_factory.mktemp("llm-fleet"), install_root=False)
    for field, value in (("telemetry_window_s", 1), ("telemetry_upload_interval_s", 1)):
        setattr(server.settings, field, value)
    home = tmp_path_factory.mktemp("release-home") / "home"
    shutil.copytree(tiny_llm.home, home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFLEET_HOME", str(home))
        ok("keys", "init")
        ok("publish", MODEL, "--server", server.url, "--api-key", server.admin_key, "--yes")
    yield server
    server.close()


def test_the_tiny_llama_is_rolled_out_gated_on_ttft_and_chats_through_the_openai_client(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state_dir = tmp_path_factory.mktemp("agent-llm")
    done = agent_cli(state_dir, "enroll", "--server", fleet.url, "--token", fleet.enroll_token())
    assert done.returncode == 0, done.stderr
    device_id = _device_id(fleet, state_dir)
    _group(fleet, "boards", [device_id])
    runner = start_daemon(state_dir, telemetry_upload_interval_s=1)
    daemon = next(runner)
    app = ChatApp(daemon)
    try:
        gates = ["error_rate<0.01 min=5", "ttft_p95_ms<5000 min=5"]
        rollout_id = create(fleet, f"{MODEL}@1", ["group:boards"], "100%", gates)
        view = drive(fleet, rollout_id, timeout_s=150)
        wait_until(lambda: len(app.local()) >= 5, timeout_s=60)
        assert view["state"] == "completed", [(d["action"], d["reason"]) for d in view["decisions"]]
        gate = next(g for g in view["waves"][0]["gates"] if g["gate"].startswith("ttft_p95_ms"))
        assert gate["status"] == "pass" and 0 < gate["value"] < 5000, gate
        installed = [e for e in fleet.install_events(device_id) if e.get("result") == "installed"]
        assert installed and installed[-1]["variant"].startswith("gguf-") and installed[-1]["runtime"] == "llama_cpp"
        _chat_like_an_app(daemon)
    finally:
        app.stop.set()
        for _ in runner:
            pass
    assert len({a.choices[0].message.content for a in app.local()}) == 1  # greedy: one answer, every time


def _chat_like_an_app(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=30)
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert whole.model_extra["edgefleet"]["source"] == "local" and whole.model_extra["edgefleet"]["version"] == 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
