"""What the agent keeps on disk is private to its user: state directory 0700, telemetry database 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.telemetry.buffer import TelemetryBuffer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A permissive umask (0022, the usual default) so that only explicit modes make files private."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_state_directory_is_0700_even_when_it_existed_with_an_open_mode(tmp_path: Path, open_umask: None) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    agent = Agent.build(AgentConfig(state_dir=state_dir), follow_pointers=False)
    try:
        assert mode(state_dir) == 0o700
    finally:
        agent.close()


def test_a_new_state_directory_is_created_0700(tmp_path: Path, open_umask: None) -> None:
    config = AgentConfig(state_dir=tmp_path / "deep" / "state")
    assert mode(config.ensure_state_dir()) == 0o700


def test_the_telemetry_database_and_its_wal_are_0600(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "telemetry.db"
    buffer = TelemetryBuffer(path, cap_bytes=1 << 20)
    try:
        buffer.put("events", "error", {"type": "error", "at": "2026-01-01T00:00:00+00:00"})
        assert mode(path) == 0o600
        wal = path.with_name("telemetry.db-wal")
        assert wal.exists() and mode(wal) == 0o600
    finally:
        buffer.close()


def test_an_existing_world_readable_telemetry_database_is_tightened(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "telemetry.db"
    TelemetryBuffer(path, cap_bytes=1 << 20).close()
    path.chmod(0o644)
    TelemetryBuffer(path, cap_bytes=1 << 20).close()
    assert mode(path) == 0o600
