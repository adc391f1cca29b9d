from __future__ import annotations

from pathlib import Path

import pytest

from tests.device_agent.helpers import publish_bundle


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Targets: tiny@1, tiny@2 (good), tiny@3 (golden outputs that fail), tiny@4 (latency budget no device meets)."""
    root = tmp_path_factory.mktemp("targets")
    work = tmp_path_factory.mktemp("bundle-src")
    publish_bundle(root, work, "tiny", 1)
    publish_bundle(root, work, "tiny", 2)
    publish_bundle(root, work, "tiny", 3, bad_golden=True)
    publish_bundle(root, work, "tiny", 4, budget_latency_ms=1e-6)
    return root
