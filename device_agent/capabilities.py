"""What this device reports it can run: the probed host, narrowed to the runtimes the operator allows.

:func:`bundles.selection.probe_capabilities` finds every runtime installed on the host. A device
whose operator sets ``runtimes = "litert"`` in ``agent.toml`` (``EDGEFLEET_AGENT_RUNTIMES``) runs
models only there (ONNX Runtime installed for another application is then neither reported to the
server nor used), so the server directs it to a variant validated on LiteRT and the Predictor
loads it there. Every place that needs the device's capabilities (enrollment, inventory, variant
selection, loading) goes through :func:`device_capabilities`.
"""

from __future__ import annotations

import dataclasses

from bundles.selection import DeviceCapabilities, probe_capabilities
from device_agent.config import AgentConfig


def device_capabilities(config: AgentConfig) -> DeviceCapabilities:
    """This host's capabilities with only the allowed runtimes (all of them when none is configured)."""
    caps = probe_capabilities(config.state_dir if config.state_dir.exists() else ".")
    allowed = config.allowed_runtimes
    if not allowed:
        return caps
    return dataclasses.replace(caps, runtimes={k: v for k, v in caps.runtimes.items() if k in allowed})


__all__ = ["device_capabilities"]
