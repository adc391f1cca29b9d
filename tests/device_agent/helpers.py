"""Shared helpers for the agent tests: real tiny bundles published as target files, and a device."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundles.archive import pack_variant
from bundles.manifest import Manifest
from bundles.predictor import Predictor
from bundles.selection import probe_capabilities
from bundles.testing import build_bundle_dir, with_golden_offset, write_manifest
from device_agent.config import AgentConfig, load_config
from device_agent.inference import LocalEngine
from device_agent.update.record import DeploymentRecord
from device_agent.updater import Updater

VARIANT = "onnx-fp32"


def publish_bundle(
    targets_dir: Path,
    work_dir: Path,
    name: str,
    version: int,
    bad_golden: bool = False,
    budget_latency_ms: float | None = None,
    unbounded_batch: bool = False,
) -> Manifest:
    """Build a real bundle and lay it out as the targets ``<name>/<version>/{manifest.json, <variant>.tar.gz}``.

    ``unbounded_batch`` drops the validated range of the batch dimension (the schema then bounds no request).
    """
    src = work_dir / f"src-{name}-{version}"
    manifest = build_bundle_dir(src, name=name, version=version, seed=version)
    if unbounded_batch:
        inputs = tuple(dataclasses.replace(t, dim_ranges={}) for t in manifest.inputs)
        manifest = dataclasses.replace(manifest, inputs=inputs)
    if bad_golden:
        manifest = with_golden_offset(manifest, 1.0)
    if budget_latency_ms is not None:
        config = dataclasses.replace(manifest.runtime_config, budget_latency_ms=budget_latency_ms)
        manifest = dataclasses.replace(manifest, runtime_config=config)
    write_manifest(src, manifest)
    out = targets_dir / name / str(version)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_bytes(manifest.to_bytes())
    pack_variant(src, manifest, VARIANT, out / f"{VARIANT}.tar.gz")
    return manifest


class DirectorySource:
    """A BundleSource over plain target files: isolates the machine from TUF (tested in tests/e2e)."""

    def __init__(self, targets_dir: Path, cache_dir: Path) -> None:
        self.targets_dir, self.cache_dir = targets_dir, cache_dir
        self.fetched: list[str] = []
        self.custom: dict[str, dict[str, Any]] = {}  # target path -> its signed custom field

    def refresh(self) -> None:
        return None

    def target_length(self, target_path: str) -> int:
        return (self.targets_dir / target_path).stat().st_size

    def target_custom(self, target_path: str) -> dict[str, Any]:
        return dict(self.custom.get(target_path, {}))

    def fetch(self, target_path: str) -> Path:
        self.fetched.append(target_path)
        cached = self.cache_dir / target_path
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.targets_dir / target_path, cached)
        return cached

    def forget(self, target_path: str) -> None:
        (self.cache_dir / target_path).unlink(missing_ok=True)


@dataclass
class ListReporter:
    reports: list[dict[str, Any]] = field(default_factory=list)

    def report(self, record: DeploymentRecord) -> None:
        self.reports.append(record.to_dict())


def entry(name: str, version: int) -> dict[str, Any]:
    return {"name": name, "version": version, "manifest_target": f"{name}/{version}/manifest.json"}


@dataclass
class Device:
    """A device's state dir with a freshly started engine and updater (a 'process')."""

    config: AgentConfig
    source: DirectorySource
    reporter: ListReporter
    engine: LocalEngine
    updater: Updater

    @classmethod
    def start(cls, state_dir: Path, targets_dir: Path, reporter: ListReporter | None = None) -> Device:
        config = load_config(environ={}, state_dir=state_dir, min_free_disk_bytes=0, health_runs=2)
        source = DirectorySource(targets_dir, state_dir / "cache")
        reporter = reporter or ListReporter()
        engine = LocalEngine(threads=1)
        caps = probe_capabilities(state_dir)
        updater = Updater(config, engine, lambda: caps, reporter, source)
        return cls(config, source, reporter, engine, updater)

    def committed_version(self, model: str) -> int | None:
        slots = self.updater.slots.model(model)
        info = slots.info(slots.pointer().committed)
        return None if info is None else info.version


def assert_one_committed_loadable(state_dir: Path, model: str) -> int:
    """The invariant: exactly one committed slot, served, and it loads and passes its self-test."""
    from device_agent.slots import ModelSlots

    slots = ModelSlots(state_dir / "models", model)
    pointer = slots.pointer()
    assert pointer.committed is not None, "no committed slot"
    assert pointer.active == pointer.committed, f"served slot {pointer.active} is not the committed {pointer.committed}"
    assert not (state_dir / "deployment.json").exists(), "a deployment record was left behind"
    info = slots.info(pointer.committed)
    assert info is not None
    manifest = slots.manifest(pointer.committed)
    with Predictor.load(manifest, slots.slot_dir(pointer.committed), variant=info.variant) as predictor:
        predictor.self_test()
    return info.version
