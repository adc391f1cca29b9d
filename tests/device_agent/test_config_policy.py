"""One operator-visible configuration: agent.toml's tables reach serving and telemetry, and the Python API
serves with the same policy and cloud fallback as the daemon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundles.errors import ConfigError
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.daemon import Daemon
from tests.device_agent.helpers import VARIANT, entry, publish_bundle
from tests.device_agent.telemetry.oip_server import OipServer

TOML = """
state_dir = "{state_dir}"
max_concurrency = 2

[serving]
cloud_timeout_s = 0.5
breaker_failures = 5
cache_entries = 0

[telemetry]
window_s = 15
sample_rate = 0.05
buffer_cap_bytes = 2000000
"""


def test_the_serving_and_telemetry_tables_reach_their_settings(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(TOML.format(state_dir=tmp_path / "device"))
    config = load_config(path, environ={"EDGEFLEET_AGENT_SERVING__BREAKER_FAILURES": "7"})
    assert config.max_concurrency == 2 and config.serving["breaker_failures"] == 7  # the environment wins
    agent = Agent.build(config)
    try:
        assert agent.pipeline.config.cloud_timeout_s == 0.5 and agent.pipeline.config.breaker_failures == 7
        assert agent.pipeline.config.cache_entries == 0
        settings = agent.recorder.settings
        assert (settings.window_s, settings.sample_rate, settings.buffer_cap_bytes) == (15.0, 0.05, 2_000_000)
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[serving]\ncloud_timout_s = 1\n", "unknown setting(s) cloud_timout_s"),
        ("[serving]\nbreaker_failures = 'many'\n", "breaker_failures"),
        ("[telemetry]\nsample_rate = 2.0\n", "telemetry settings out of range"),
        ("serving = 3\n", "[serving]"),
    ],
)
def test_a_bad_table_fails_at_load_naming_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        load_config(path, environ={})


def test_the_python_api_uses_the_desired_states_cloud_fallback_like_the_daemon(tmp_path: Path) -> None:
    manifest = publish_bundle(tmp_path / "targets", tmp_path, "tiny", 1)
    src = tmp_path / "src-tiny-1"
    assert Manifest.from_bytes((src / "manifest.json").read_bytes()) == manifest
    state_dir = tmp_path / "device"
    state_dir.mkdir()
    with Predictor.load(manifest, src, variant=VARIANT) as model, OipServer({"tiny": model}) as cloud:
        desired = {"models": [entry("tiny", 1)], "fallback": {"url": cloud.url, "model": "tiny"}}
        (state_dir / "desired.json").write_text(json.dumps({"state": desired, "etag": '"1"'}))
        app = Agent.from_config(environ={}, state_dir=state_dir, serving={"cloud_timeout_s": 1.5})
        daemon_agent = Agent.from_config(environ={}, state_dir=state_dir, serving={"cloud_timeout_s": 1.5})
        daemon = Daemon(daemon_agent)
        daemon._follow_desired_sections()
        try:
            assert app.pipeline.config == daemon_agent.pipeline.config  # one policy, whoever serves
            assert app.pipeline.config.cloud_url == cloud.url and app.pipeline.config.cloud_timeout_s == 1.5
            answer = app.predict({"x": np.zeros((1, 4), np.float32)}, model="tiny")  # nothing installed locally
            assert answer.source == "cloud" and cloud.requests == 1
        finally:
            app.close()
            daemon_agent.close()


def test_the_fleets_telemetry_window_survives_a_restart_without_the_server(tmp_path: Path) -> None:
    """The desired state is saved with its telemetry section and followed at start, before any poll."""
    state_dir = tmp_path / "device"
    state_dir.mkdir()
    desired = {"models": [], "telemetry": {"window_s": 15, "sample_rate": 0.2}}
    (state_dir / "desired.json").write_text(json.dumps({"state": desired, "etag": '"7"'}))
    agent = Agent.from_config(environ={}, state_dir=state_dir)
    try:
        assert agent.recorder.settings.window_s == 60.0  # the device's own default until the daemon starts
        Daemon(agent)._follow_desired_sections()  # what `run` does first, server or not
        assert (agent.recorder.settings.window_s, agent.recorder.settings.sample_rate) == (15.0, 0.2)
    finally:
        agent.close()
