"""A deployment that fails before it changed the device is retried with backoff, and refused as early as possible.

- Backoff: the n-th failure of the same desired target waits about ``retry_initial_s * 2**(n-1)``
  (jittered over the upper half, capped); polls in between do nothing; a new desired target or a
  success starts over.
- Early refusal: a signed variant archive bigger than its manifest's declared files can be is not
  downloaded at all; an archive member the manifest does not declare stops the unpack at once.
- The release floor: a device is never directed below the minimum version the release key signed
  (the reason is in the install report); above it, a downgrade is allowed and reported as such.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from bundles.manifest import Manifest
from device_agent.agent import is_downgrade
from device_agent.update.backoff import backoff_s
from device_agent.update.record import DeploymentRecord
from tests.device_agent.helpers import VARIANT, Device, ListReporter, entry


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def targets(tmp_path: Path, published: Path) -> Path:
    """A private copy of the published targets, so a test may tamper with them."""
    copy = tmp_path / "targets"
    shutil.copytree(published, copy)
    return copy


@pytest.fixture
def device(tmp_path: Path, targets: Path) -> tuple[Device, Clock]:
    """tiny@1 committed; the retry schedule on a fake clock."""
    dev = Device.start(tmp_path / "device", targets)
    dev.updater.apply({"models": [entry("tiny", 1)]})
    dev.reporter.reports.clear()
    clock = Clock()
    dev.updater.retries.clock = clock
    return dev, clock


def swell_archive(targets: Path, version: int, extra_bytes: int) -> Path:
    """Append a big undeclared member to a variant archive (as a bad converter or a stolen key might)."""
    path = targets / "tiny" / str(version) / f"{VARIANT}.tar.gz"
    members = []
    with tarfile.open(path, "r:gz") as tar:
        for info in tar.getmembers():
            file = tar.extractfile(info)
            members.append((info, None if file is None else file.read()))
    extra = tarfile.TarInfo("onnx-fp32/zzz-padding.bin")
    extra.size = extra_bytes
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
        tar.addfile(extra, io.BytesIO(os.urandom(extra_bytes)))
    return path


def statuses(reporter: ListReporter) -> list[str]:
    return [r["status"] for r in reporter.reports]


def test_backoff_doubles_with_jitter_over_the_upper_half_and_is_capped() -> None:
    for failures, ceiling in [(1, 60), (2, 120), (3, 240), (7, 3600), (30, 3600)]:
        delays = [backoff_s(failures, 60, 3600) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not in step


def test_an_archive_too_big_for_its_manifest_is_refused_before_download_then_retried_with_backoff(
    device: tuple[Device, Clock], targets: Path
) -> None:
    dev, clock = device
    declared = Manifest.from_bytes((targets / "tiny" / "2" / "manifest.json").read_bytes()).variant(VARIANT)
    assert declared.size_bytes < 64 * 1024
    swell_archive(targets, 2, extra_bytes=2 << 20)  # 2 MiB more than the small declared model
    archive_target = f"tiny/2/{VARIANT}.tar.gz"

    dev.updater.apply({"models": [entry("tiny", 2)]})
    assert statuses(dev.reporter) == ["failed"]
    assert "more than" in dev.reporter.reports[0]["error"] and "not downloaded" in dev.reporter.reports[0]["error"]
    assert archive_target not in dev.source.fetched
    assert dev.committed_version("tiny") == 1

    fetched = len(dev.source.fetched)
    for _ in range(5):  # polls during the backoff (the first delay is 30-60 s) do nothing at all
        clock.now += 5
        dev.updater.apply({"models": [entry("tiny", 2)]})
    assert len(dev.reporter.reports) == 1 and len(dev.source.fetched) == fetched

    clock.now += 60  # past the first delay (30-60 s)
    dev.updater.apply({"models": [entry("tiny", 2)]})
    assert statuses(dev.reporter) == ["failed", "failed"]
    assert dev.updater.retries.failures("tiny") == 2
    clock.now += 59  # the second delay is 60-120 s: 59 s more (69 s after the failure) may still be too early
    waited = dev.updater.retries.wait_s("tiny", "tiny@2/*/tiny/2/manifest.json")
    assert 0 < waited <= 120 - 59


def test_a_new_desired_target_resets_the_backoff(device: tuple[Device, Clock], targets: Path) -> None:
    dev, clock = device
    swell_archive(targets, 2, extra_bytes=2 << 20)
    dev.updater.apply({"models": [entry("tiny", 2)]})
    dev.updater.apply({"models": [entry("tiny", 2)]})
    assert statuses(dev.reporter) == ["failed"]  # backing off

    dev.updater.apply({"models": [entry("tiny", 4)]})  # the server asks for something else: tried at once
    assert len(dev.reporter.reports) == 2
    assert dev.updater.retries.failures("tiny") == 0  # tiny@4 failed its health check: not a backoff case


def test_a_success_clears_the_schedule(device: tuple[Device, Clock], targets: Path, published: Path) -> None:
    dev, clock = device
    pristine = (published / "tiny" / "2" / f"{VARIANT}.tar.gz").read_bytes()
    swell_archive(targets, 2, extra_bytes=2 << 20)
    dev.updater.apply({"models": [entry("tiny", 2)]})
    (targets / "tiny" / "2" / f"{VARIANT}.tar.gz").write_bytes(pristine)  # the server serves a good copy
    clock.now += 3600
    dev.updater.apply({"models": [entry("tiny", 2)]})
    assert statuses(dev.reporter) == ["failed", "installed"]
    assert dev.updater.retries.failures("tiny") == 0 and dev.committed_version("tiny") == 2


def test_an_undeclared_member_stops_the_unpack_and_is_retried_with_backoff(
    device: tuple[Device, Clock], targets: Path
) -> None:
    dev, clock = device
    swell_archive(targets, 2, extra_bytes=16)  # small enough to pass the length bound
    dev.updater.apply({"models": [entry("tiny", 2)]})
    report = dev.reporter.reports[-1]
    assert report["status"] == "failed"
    assert "stage:" in report["error"] and "zzz-padding.bin' is not a file the manifest declares" in report["error"]
    assert dev.updater.failed.reason("tiny@2") is None  # not refused for good: retried after the backoff
    assert dev.updater.retries.failures("tiny") == 1
    assert not any(p.name.startswith(".") for p in (dev.config.models_dir / "tiny").iterdir())  # no staging left


def test_a_device_refuses_to_be_directed_below_the_release_floor(device: tuple[Device, Clock]) -> None:
    dev, _ = device
    dev.updater.apply({"models": [entry("tiny", 2)]})
    assert dev.committed_version("tiny") == 2
    for version in (1, 2):  # what the signed targets say about each version of tiny
        dev.source.custom[f"tiny/{version}/manifest.json"] = {"edgefleet": {"kind": "manifest", "min_version": 2}}

    dev.updater.apply({"models": [entry("tiny", 1)]})
    report = dev.reporter.reports[-1]
    assert report["status"] == "failed" and report["version"] == 1
    assert "the release key set the minimum version of tiny to 2; refusing to install version 1" in report["error"]
    assert dev.committed_version("tiny") == 2
    assert "tiny/1/manifest.json" not in dev.source.fetched[-1:]  # refused on the signed metadata alone


def test_a_downgrade_above_the_floor_installs_and_is_reported_as_a_downgrade(device: tuple[Device, Clock]) -> None:
    dev, _ = device
    dev.updater.apply({"models": [entry("tiny", 2)]})
    dev.source.custom["tiny/1/manifest.json"] = {"edgefleet": {"kind": "manifest", "min_version": 1}}
    dev.updater.apply({"models": [entry("tiny", 1)]})
    report = dev.reporter.reports[-1]
    assert report["status"] == "installed" and dev.committed_version("tiny") == 1
    assert is_downgrade(DeploymentRecord.from_dict(report))
    assert not is_downgrade(DeploymentRecord.from_dict(dev.reporter.reports[0]))
