"""Recompute a conversion's metric from the bundle's own files, independently of the converter's code.

Each kept variant's entry file is run with a plain ``onnxruntime.InferenceSession`` on the eval
inputs the test built, and the metric is computed with scikit-learn (or numpy) by the test; the
figure must equal what the conversion reported for that variant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bundles.archive import open_bundle
from bundles.manifest import Manifest
from converter.home import Home
from converter.registry import Registry

Score = Callable[[dict[str, np.ndarray]], float]


def latest(home: Path, name: str) -> tuple[dict[str, dict[str, Any]], Path]:
    """(results by variant id, archive path) of the latest conversion of ``name``."""
    registry = Registry(Home(home))
    model = registry.get(name)
    conversion = registry.latest_conversion(model)
    archive = Home(home).conversion_dir(name, model.version, conversion.number) / conversion.bundle_file
    return {r["variant_id"]: r for r in conversion.results}, archive


def run_variant(bundle_dir: Path, entry: str, inputs: dict[str, np.ndarray], chunk: int = 32) -> dict[str, np.ndarray]:
    """All outputs of one variant file over all rows (in chunks the declared batch range allows)."""
    session = ort.InferenceSession(str(bundle_dir / entry), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rows = len(next(iter(inputs.values())))
    parts = [session.run(names, {k: v[i : i + chunk] for k, v in inputs.items()}) for i in range(0, rows, chunk)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def assert_reported_metric(home: Path, name: str, inputs: dict[str, np.ndarray], score: Score,
                           tmp_path: Path) -> Manifest:  # fmt: skip
    """Every kept variant's metric, recomputed from its file with ``score``, equals the reported one."""
    results, archive = latest(home, name)
    manifest, bundle_dir = open_bundle(archive, tmp_path / f"unpacked-{name}")
    assert manifest.variants, "the bundle keeps no variant"
    for variant in manifest.variants:
        recomputed = score(run_variant(bundle_dir, variant.entry, inputs))
        reported = results[variant.id]["metrics"]["metric_value"]
        assert abs(recomputed - reported) < 1e-6, (variant.id, recomputed, reported)
        assert abs(variant.metrics["metric_value"] - reported) <= 1e-5 * max(1.0, abs(reported))
    return manifest
