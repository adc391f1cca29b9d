"""The runtimes an operator allows: reported to the server, used for selection and loading, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundles.errors import ConfigError
from bundles.selection import installed_runtimes
from device_agent.capabilities import device_capabilities
from device_agent.config import load_config


def test_only_the_allowed_runtimes_are_reported(tmp_path: Path) -> None:
    installed = installed_runtimes()
    assert {"onnxruntime", "litert"} <= set(installed)  # the agent's test environment: agent,onnx,tflite
    config = load_config(environ={"EDGEFLEET_AGENT_STATE_DIR": str(tmp_path), "EDGEFLEET_AGENT_RUNTIMES": "litert"})
    assert config.allowed_runtimes == ("litert",)
    assert device_capabilities(config).runtimes == {"litert": installed["litert"]}
    everything = load_config(environ={"EDGEFLEET_AGENT_STATE_DIR": str(tmp_path)})
    assert device_capabilities(everything).runtimes == installed


def test_an_unknown_runtime_name_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="runtimes: unknown runtime\\(s\\) tensorflow \\(known: onnxruntime, litert"):
        load_config(
            environ={"EDGEFLEET_AGENT_STATE_DIR": str(tmp_path), "EDGEFLEET_AGENT_RUNTIMES": "litert,tensorflow"}
        )
