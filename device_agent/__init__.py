"""edgefleet's device agent: safe model updates (A/B slots, self-test, rollback) and local inference.

``from device_agent import Agent`` is the Python API; ``edgefleet-agent`` (``device_agent.cli``)
runs the daemon. The package imports only what ``edgefleet[agent,onnx]`` installs; runtimes load
lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.agent import Agent

__all__ = ["Agent"]


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from device_agent.agent import Agent

        return Agent
    raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
