"""Shared fixtures: one real bundle (two ONNX variants) built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bundles.manifest import Manifest
from bundles.testing import build_bundle_dir


@pytest.fixture(scope="session")
def pristine_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    """A bundle directory with variants onnx-fp32 and onnx-fp16; never modify it, copy it."""
    root = tmp_path_factory.mktemp("pristine") / "tiny"
    manifest = build_bundle_dir(root, precisions=("fp32", "fp16"))
    return manifest, root


@pytest.fixture()
def bundle(pristine_bundle: tuple[Manifest, Path], tmp_path: Path) -> tuple[Manifest, Path]:
    """A private copy of the pristine bundle that a test may alter."""
    manifest, root = pristine_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    return manifest, copy
