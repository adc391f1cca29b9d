"""The agent's version, reported in inventory and telemetry."""

from __future__ import annotations

AGENT_VERSION = "0.1.0"
