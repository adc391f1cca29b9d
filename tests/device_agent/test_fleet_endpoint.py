"""The fleet's inference endpoint: the desired state announces it, the device follows it with its own token.

The server names its endpoint in every desired state (``fallback.url``); the device sends its access
token there and follows a new URL at the next desired state. A URL set only in agent.toml never gets
the token. An old server that announces nothing leaves the device to guess ``<server_url>/v2``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bundles.predictor import Predictor
from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.identity import Enrollment
from tests.device_agent.helpers import VARIANT, entry, publish_bundle
from tests.device_agent.telemetry.oip_server import OipServer

TOKEN = "efd_device-token"
X = np.zeros((1, 4), np.float32)


@pytest.fixture
def clouds(tmp_path: Path) -> Iterator[tuple[OipServer, OipServer]]:
    """Two OIP endpoints serving the real ``tiny@1`` (the fleet's endpoint before and after a move)."""
    manifest = publish_bundle(tmp_path / "targets", tmp_path, "tiny", 1)
    with Predictor.load(manifest, tmp_path / "src-tiny-1", variant=VARIANT) as model:
        with OipServer({"tiny": model}) as first, OipServer({"tiny": model}) as second:
            yield first, second


def _enrolled_device(tmp_path: Path, serving: dict[str, object] | None = None) -> Path:
    """A state directory enrolled at a fleet server that does not run the inference endpoint itself."""
    config = load_config(environ={}, state_dir=tmp_path / "device", serving=serving or {})
    config.ensure_state_dir()
    server = "http://127.0.0.1:9"  # the discard port: a guessed <server_url>/v2 would never answer
    Enrollment(server, "dev-1", TOKEN, "accepted", f"{server}/tuf/metadata", f"{server}/tuf/targets").save(
        config.identity_dir, {}
    )
    return config.state_dir


def _announce(state_dir: Path, url: str | None, etag: str) -> None:
    """Save a desired state as the daemon does after a poll (``url`` None: an old server's, no fallback)."""
    desired: dict[str, object] = {"models": [entry("tiny", 1)]}
    if url is not None:
        desired["fallback"] = {"url": url, "model": "tiny"}
    (state_dir / "desired.json").write_text(json.dumps({"state": desired, "etag": etag}))


def test_the_device_sends_its_token_to_the_announced_endpoint_and_follows_a_new_one(
    tmp_path: Path, clouds: tuple[OipServer, OipServer]
) -> None:
    first, second = clouds
    state_dir = _enrolled_device(tmp_path)
    _announce(state_dir, first.url, '"1"')
    agent = Agent.from_config(environ={}, state_dir=state_dir)
    try:
        assert agent.predict({"x": X}, model="tiny").source == "cloud"
        assert first.authorizations == [f"Bearer {TOKEN}"]
        agent.follow_fallback({"url": second.url, "model": "tiny"})  # the next desired state moved it
        assert agent.pipeline.config.cloud_url == second.url
        assert agent.predict({"x": X}, model="tiny").source == "cloud"
        assert second.authorizations == [f"Bearer {TOKEN}"] and first.requests == 1
    finally:
        agent.close()


def test_an_endpoint_set_only_in_agent_toml_never_gets_the_device_token(
    tmp_path: Path, clouds: tuple[OipServer, OipServer]
) -> None:
    fleets, operators = clouds
    state_dir = _enrolled_device(tmp_path, serving={"cloud_url": operators.url})
    _announce(state_dir, fleets.url, '"1"')
    agent = Agent.from_config(environ={}, state_dir=state_dir, serving={"cloud_url": operators.url})
    try:
        assert agent.pipeline.config.cloud_url == operators.url  # agent.toml wins over the announcement
        assert agent.predict({"x": X}, model="tiny").source == "cloud"
        assert operators.authorizations == [None] and fleets.requests == 0
    finally:
        agent.close()


def test_without_an_announcement_an_old_servers_device_guesses_its_server_url(tmp_path: Path) -> None:
    state_dir = _enrolled_device(tmp_path)
    _announce(state_dir, None, '"1"')
    agent = Agent.from_config(environ={}, state_dir=state_dir)
    try:
        assert agent.pipeline.config.cloud_url == "http://127.0.0.1:9/v2"
        assert agent.pipeline.config.cloud_token == TOKEN
    finally:
        agent.close()
