"""Test helpers: published bundles, devices and their telemetry written as the intake stores them.

``Fleet`` arranges rows directly (fast, for engine tests); the e2e tests go through the real device
API instead. Window payloads follow docs/telemetry.md: counters, a latency histogram on the shared
log-spaced edges, feature and output histograms on the bundle baseline's bins, shadow counts.
"""

from __future__ import annotations

import bisect
import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bundles.manifest import Manifest
from bundles.testing import build_bundle_dir
from fleet_server.db import session_scope
from fleet_server.models import (
    Assignment,
    BundleRecord,
    Device,
    DeviceEvent,
    DeviceGroup,
    DeviceGroupMember,
    MetricWindow,
    TelemetryBatch,
)
from fleet_server.telemetry.aggregate import LATENCY_EDGES_MS

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
CAPS = {"arch": "aarch64", "os": "linux", "python": "3.11.2", "runtimes": {"onnxruntime": "1.20.1"},
        "accelerators": ["cpu"], "memory_mb": 3800, "disk_free_mb": 20000, "preferences": []}  # fmt: skip


class Clock:
    """A settable clock for the engine."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


def publish(session: Session, tmp: Path, name: str, version: int, min_runtime: str = "1.16") -> Manifest:
    """Build a real bundle directory and register its manifest as a published bundle."""
    manifest = build_bundle_dir(tmp / f"{name}-{version}", name=name, version=version, min_runtime_version=min_runtime)
    session.add(BundleRecord(name=name, version=version, manifest=manifest.to_dict(),
                             manifest_target=f"{name}/{version}/manifest.json",
                             variants=[v.to_dict() for v in manifest.variants]))  # fmt: skip
    return manifest


def window_payload(
    manifest: Manifest,
    requests: int,
    errors: int = 0,
    fallbacks: int = 0,
    latency_ms: float = 2.0,
    drift: bool = False,
    shadow: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """A metric window payload: ``drift`` puts every input and output in one bin (PSI far above 0.2)."""
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[bisect.bisect_right(LATENCY_EDGES_MS, latency_ms)] = requests
    baseline = manifest.drift_baseline
    features = {h.name: _counts(h.freqs, requests, drift) for h in baseline.features}
    out = baseline.output
    output = {out.name: _counts(out.freqs, requests, drift)} if out is not None else {}
    return {"counters": {"requests": requests, "rows": requests, "errors": errors, "fallbacks": fallbacks},
            "latency_ms": {"counts": latency, "sum": latency_ms * requests}, "features": features,
            "output": output, "shadow": {"compared": shadow[0], "agreed": shadow[1]}}  # fmt: skip


def _counts(freqs: tuple[float, ...], total: int, drift: bool) -> list[int]:
    if drift:
        return [0] * (len(freqs) - 1) + [total]
    return [round(f * total) for f in freqs]


@dataclass
class Fleet:
    """Devices, groups, assignments and telemetry rows for engine tests."""

    factory: sessionmaker[Session]
    manifests: dict[int, Manifest] = field(default_factory=dict)

    def add_devices(self, n: int, group: str = "lab", version: int | None = 1, caps: dict[str, Any] | None = None,
                    prefix: str = "dev", status: str = "accepted") -> list[str]:  # fmt: skip
        """``n`` accepted devices in ``group``, each assigned ``digits@version`` (if given)."""
        ids = [f"{prefix}-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        with session_scope(self.factory) as session:
            group_row = session.scalar(select(DeviceGroup).where(DeviceGroup.name == group))
            if group_row is None:
                group_row = DeviceGroup(name=group)
                session.add(group_row)
                session.flush()
            for device_id in ids:
                capabilities = caps if caps is not None else CAPS
                session.add(Device(id=device_id, public_key=uuid.uuid4().hex * 2, fleet="lab", status=status,
                                   capabilities=capabilities, installed=[], arch=capabilities.get("arch"),
                                   os=capabilities.get("os"), memory_mb=capabilities.get("memory_mb"),
                                   disk_free_mb=capabilities.get("disk_free_mb")))  # fmt: skip
                session.flush()
                session.add(DeviceGroupMember(group_id=group_row.id, device_id=device_id))
                if version is not None:
                    session.add(Assignment(device_id=device_id, model_name="digits", bundle_version=version,
                                           variant="onnx-fp32", pinned=False, updated_at=T0))  # fmt: skip
        return ids

    def assignment(self, device_id: str, model: str = "digits") -> Assignment | None:
        with self.factory() as session:
            return session.scalar(select(Assignment).where(Assignment.device_id == device_id,
                                                           Assignment.model_name == model))  # fmt: skip

    def _batch(self, session: Session, device_id: str) -> int:
        batch = TelemetryBatch(device_id=device_id, batch_id=uuid.uuid4().hex)
        session.add(batch)
        session.flush()
        return batch.id

    def install(self, device_id: str, version: int, at: dt.datetime, result: str = "installed",
                reason: str | None = None, rollout_id: int | None = None) -> None:  # fmt: skip
        """An ``install`` event as the agent sends it."""
        payload = {"type": "install", "at": at.isoformat(), "model": "digits", "version": version,
                   "deployment_id": rollout_id, "to_version": version, "result": result, "reason": reason}  # fmt: skip
        with session_scope(self.factory) as session:
            session.add(DeviceEvent(batch_pk=self._batch(session, device_id), device_id=device_id, type="install",
                                    model_name="digits", bundle_version=version, at=at, payload=payload))  # fmt: skip

    def report(self, device_id: str, version: int, start: dt.datetime, seconds: float, **window: Any) -> None:
        """One metric window of ``seconds`` starting at ``start`` on ``digits@version``."""
        payload = window_payload(self.manifests[version], **window)
        end = start + dt.timedelta(seconds=seconds)
        with session_scope(self.factory) as session:
            session.add(MetricWindow(batch_pk=self._batch(session, device_id), device_id=device_id,
                                     model_name="digits", bundle_version=version, window_start=start,
                                     window_end=end, payload=payload))  # fmt: skip

    def healthy_device(self, device_id: str, version: int, installed_at: dt.datetime, soak_s: float,
                       requests: int = 200, **window: Any) -> None:  # fmt: skip
        """Install ``version`` at ``installed_at`` and report a window covering the soak."""
        self.install(device_id, version, installed_at)
        self.report(device_id, version, installed_at, soak_s + 1, requests=requests, **window)
