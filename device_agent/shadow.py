"""Shadow mode: run a candidate bundle beside the active model on live inputs, answer with the active one.

A rollout's shadow wave puts ``"shadow": {"version", "manifest_target"}`` on a model's desired-state
entry. :class:`ShadowMode` then:

1. installs that bundle through the device's bundle source (the same TUF-verified fetch as an
   update: signed manifest, signed length and hashes of the selected variant's archive) into the
   model's own ``slot_shadow`` directory, never touching the A/B slots or their pointer;
2. loads it and replays its golden self-test (a shadow that fails it is not run, and says why);
3. hands it to the serving pipeline (:meth:`ServingPipeline.set_shadow`), which after every local
   answer of the active model runs the shadow on a copy of the same inputs on one background
   thread (skipped while a previous shadow run is still busy, so the active path never waits) and
   reports agreement (same top-1) and the shadow's latency through ``record_shadow`` into the
   shadow version's metric window: what the server reads as the cohort's shadow agreement.

A desired state without ``shadow`` stops it. The heartbeat lists the shadow as ``state: "shadow"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundles.archive import ArchiveLimits
from bundles.errors import EdgeFleetError, MixAndMatchError
from bundles.manifest import Manifest
from bundles.selection import select_variant

log = logging.getLogger(__name__)

SHADOW_SLOT = "shadow"
"""The slot name of a model's shadow bundle (directory ``slot_shadow``, next to ``slot_a``/``slot_b``)."""


@dataclass(frozen=True)
class ShadowTarget:
    """One model's shadow as the desired state names it."""

    model: str
    version: int
    manifest_target: str

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> ShadowTarget | None:
        shadow = entry.get("shadow")
        if not isinstance(shadow, Mapping) or shadow.get("version") is None:
            return None
        name, version = str(entry["name"]), int(shadow["version"])
        target = shadow.get("manifest_target") or f"{name}/{version}/manifest.json"
        return cls(name, version, str(target))


class ShadowMode:
    """Follows the desired state's shadows for one agent (see the module docstring)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.running: dict[str, ShadowTarget] = {}
        self.failed: dict[ShadowTarget, str] = {}

    def apply(self, desired: Mapping[str, Any]) -> None:
        """Start, switch or stop the shadow of every model to match ``desired``."""
        wanted = {t.model: t for t in map(ShadowTarget.of, desired.get("models", [])) if t is not None}
        for model in list(self.running):
            if model not in wanted:
                self.stop(model)
        for model, target in wanted.items():
            if self.running.get(model) != target and target not in self.failed:
                self.start(target)

    def start(self, target: ShadowTarget) -> bool:
        """Install, self-test and run ``target`` as the shadow of its model; False (and logged) if it cannot."""
        try:
            predictor = self._install(target)
        except EdgeFleetError as e:
            self.failed[target] = str(e)
            log.error("shadow %s@%d not started: %s", target.model, target.version, e)
            return False
        self.stop(target.model)
        self.agent.pipeline.set_shadow(target.model, predictor)
        self.running[target.model] = target
        log.info("running %s@%d as a shadow", target.model, target.version)
        return True

    def stop(self, model: str) -> None:
        """Stop comparing ``model`` with its shadow and release the shadow's runtime."""
        self.running.pop(model, None)
        self.agent.pipeline.clear_shadow(model)

    def heartbeat_models(self) -> list[dict[str, Any]]:
        """The shadows, as heartbeat ``models`` entries."""
        return [{"name": t.model, "version": t.version, "state": "shadow"} for t in self.running.values()]

    def _install(self, target: ShadowTarget) -> Any:
        from bundles.predictor import Predictor
        from device_agent.update.source import variant_target

        updater, config = self.agent.updater, self.agent.config
        source = updater.steps.source
        source.refresh()
        raw = source.fetch(target.manifest_target).read_bytes()
        manifest = Manifest.from_bytes(raw)
        if (manifest.name, manifest.version) != (target.model, target.version):
            raise MixAndMatchError(f"target {target.manifest_target} holds {manifest.ref}, not the shadow asked for")
        variant = select_variant(manifest, self.agent.capabilities)
        slots = updater.slots.model(target.model)
        if not slots.holds(SHADOW_SLOT, raw, variant.id):
            archive = source.fetch(variant_target(target.manifest_target, variant.id))
            limits = ArchiveLimits(max_total_bytes=config.max_bundle_bytes * 4,
                                   max_member_bytes=config.max_bundle_bytes * 4,
                                   max_members=config.max_archive_members)  # fmt: skip
            slots.stage(SHADOW_SLOT, archive, raw, variant.id, limits)
        predictor = Predictor.load(manifest, slots.slot_dir(SHADOW_SLOT), variant=variant.id, threads=1)
        try:
            predictor.self_test()
        except EdgeFleetError:
            predictor.close()
            raise
        return predictor


def top1_agrees(active: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> bool:
    """Do two answers agree? The label (or class index) when both have it, else the argmax of the first output."""
    for name in ("label", "class_index"):
        if name in active and name in shadow:
            return bool(np.array_equal(np.asarray(active[name]), np.asarray(shadow[name])))
    first_active = next(iter(active.values()), None)
    first_shadow = shadow.get(next(iter(active), ""))
    if first_active is None or first_shadow is None:
        return False
    a, b = np.asarray(first_active), np.asarray(first_shadow)
    if a.dtype.kind != "f" or b.dtype.kind != "f" or a.shape != b.shape:
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(a.argmax(axis=-1), b.argmax(axis=-1)))
