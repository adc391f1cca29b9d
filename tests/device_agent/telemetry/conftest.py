from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundles.manifest import Manifest, RuntimeConfig
from bundles.predictor import Predictor
from bundles.testing import build_bundle_dir, write_manifest
from tests.device_agent.telemetry.oip_server import OipServer


def make_bundle(root: Path, version: int, seed: int, n_features: int = 4, **runtime: object) -> Manifest:
    """A real tiny ONNX classifier bundle ``tiny@version`` with extra runtime_config settings.

    The deadline is 10 s unless given, so that a loaded test machine never turns a local answer
    into a deadline fallback; the deadline test sets its own.
    """
    manifest = build_bundle_dir(root, name="tiny", version=version, seed=seed, n_features=n_features)
    runtime = {"deadline_ms": 10_000.0, **runtime}
    config = dataclasses.replace(manifest.runtime_config, **runtime)
    manifest = dataclasses.replace(manifest, runtime_config=config)
    write_manifest(root, manifest)
    return manifest


@pytest.fixture(scope="session")
def bundle_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-v1")
    make_bundle(root, 1, seed=1, static_answer={"label": ["unknown"]})
    return root


@pytest.fixture(scope="session")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-v2")
    make_bundle(root, 2, seed=2, static_answer={"label": ["unknown"]})
    return root


@pytest.fixture(scope="session")
def cloud_predictor(bundle_v2: Path) -> Iterator[Predictor]:
    manifest = Manifest.from_bytes((bundle_v2 / "manifest.json").read_bytes())
    predictor = Predictor.load(manifest, bundle_v2)
    yield predictor
    predictor.close()


@pytest.fixture
def cloud(cloud_predictor: Predictor) -> Iterator[OipServer]:
    with OipServer({"tiny": cloud_predictor}) as server:
        yield server


def runtime_config(**values: object) -> RuntimeConfig:
    return RuntimeConfig(**values)  # type: ignore[arg-type]
