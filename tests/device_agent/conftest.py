from __future__ import annotations

from pathlib import Path

import pytest

from tests.device_agent.helpers import publish_bundle


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A targets directory with tiny@1, tiny@2 (good) and tiny@3 (golden outputs that fail)."""
    root = tmp_path_factory.mktemp("targets")
    work = tmp_path_factory.mktemp("bundle-src")
    publish_bundle(root, work, "tiny", 1)
    publish_bundle(root, work, "tiny", 2)
    publish_bundle(root, work, "tiny", 3, bad_golden=True)
    return root
