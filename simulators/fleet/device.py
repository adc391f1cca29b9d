"""One virtual device: the agent's real client code, driven one step at a time by the runner.

What is real (the agent's own modules, unchanged):

* enrollment: its own Ed25519 key, the challenge signed by :class:`device_agent.client.FleetClient`;
* desired-state polls with ``If-None-Match`` (ETag), ``start_after`` honoured, the poll interval
  and jitter the server sends;
* TUF: :class:`bundles.tuf.client.TufClient` refreshes the metadata (every signature, version,
  expiry and hash checked by ``tuf.ngclient``) and downloads the manifest and the selected variant,
  resuming cut downloads with ``Range`` and refusing tampered bytes;
* telemetry: the real :class:`TelemetryRecorder` (metric windows with histograms on the baseline's
  bins, sampled prediction logs), the real SQLite :class:`TelemetryBuffer` and the real
  :class:`TelemetryUploader` (gzip batches, idempotent batch ids, backoff); install events and
  heartbeats through the contract's builders; the inventory through ``FleetClient.put_inventory``.

What is a shortcut (``docs/simulator.md``): the install does not unpack the archive into A/B slots
nor load a runtime (the variant is downloaded and verified through TUF, then "committed"), and
inference is :mod:`.behaviour`'s latency/error model. Power loss is simulated by dropping the
device's in-memory state (open windows, TUF client, ETag) at a random step of the install; what the
real agent persists (the committed version, the telemetry buffer on disk, partial downloads) survives.

:meth:`VirtualDevice.step` is blocking (the agent's clients are synchronous): the runner calls it in
a worker thread and sleeps on the event loop for the delay it returns.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundles.contract import DesiredModel, DesiredState
from bundles.errors import EdgeFleetError, TransportError
from bundles.manifest import Manifest
from bundles.tuf.client import TufClient
from device_agent.client import FleetClient
from device_agent.telemetry.buffer import TelemetryBuffer
from device_agent.telemetry.events import heartbeat_event, install_event
from device_agent.telemetry.recorder import TelemetryRecorder, TelemetrySettings
from device_agent.telemetry.uploader import TelemetryUploader
from device_agent.update.source import variant_target
from simulators.fleet.behaviour import Answer, ModelBehaviour
from simulators.fleet.net import Balancer, DeviceLink
from simulators.fleet.profiles import HardwareProfile

MODEL = "digits"
INSTALL_STEPS = ("refresh", "manifest", "download", "commit")
BUFFER_CAP_BYTES = 2_000_000
MAX_REQUESTS_PER_STEP = 50


class PowerLoss(Exception):
    """Raised inside an install to simulate the power going at that step."""


@dataclass
class DeviceFaults:
    """The faults this device suffers (drawn by the runner from the scenario)."""

    packet_loss: float = 0.0
    cut: float = 0.0
    corrupt: float = 0.0
    power_loss: float = 0.0
    slow_factor: float = 1.0
    clock_skew_s: float = 0.0
    offline_from_s: float | None = None
    offline_s: float = 0.0


@dataclass
class DeviceCounters:
    polls: int = 0
    not_modified: int = 0
    installs: int = 0
    install_failures: int = 0
    power_losses: int = 0
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    uploads: int = 0
    transport_errors: int = 0
    trust_errors: int = 0
    poll_latency_ms: list[float] = field(default_factory=list)


class Fleet:
    """What every device of one simulation shares: the server address, token, bundles' behaviours."""

    def __init__(self, base_url: str, token: str, balancer: Balancer, work_dir: Path,
                 behaviours: dict[int, tuple[str, float]], started_at: float) -> None:  # fmt: skip
        self.base_url, self.token, self.balancer, self.work_dir = base_url, token, balancer, work_dir
        self.behaviours = behaviours  # version -> (behaviour, rate)
        self.cloud_fallback = True
        self.started_at = started_at
        self._models: dict[tuple[int, str], ModelBehaviour] = {}

    def model(self, manifest: Manifest) -> ModelBehaviour:
        key = (manifest.version, manifest.to_bytes().hex()[:16])
        found = self._models.get(key)
        if found is None:
            behaviour, rate = self.behaviours.get(manifest.version, ("good", 1.0))
            found = self._models[key] = ModelBehaviour(manifest, behaviour, rate)
        return found


class VirtualDevice:
    """See the module docstring."""

    def __init__(self, index: int, profile: HardwareProfile, fleet: Fleet, faults: DeviceFaults, seed: int) -> None:
        self.index, self.profile, self.fleet, self.faults = index, profile, fleet, faults
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self.dir = fleet.work_dir / "devices" / f"{index:06d}"
        self.link = DeviceLink(fleet.balancer, self.rng, faults.packet_loss, faults.cut, faults.corrupt)
        self.client: FleetClient | None = None
        self.device_id: str | None = None
        self.trusted_root: bytes = b""
        self.etag: str | None = None
        self.desired: DesiredState | None = None
        self.running: int | None = None
        self.versions_run: set[int] = set()
        self.manifests: dict[int, Manifest] = {}
        self.state = "new"  # new, idle, installing, power_off, offline, failed
        self.power_off_until = 0.0
        self.pending_events: list[dict[str, Any]] = []
        self.staged: tuple[DesiredModel, str, int | None, str | None, float] | None = None
        self.recorder: TelemetryRecorder | None = None
        self.uploader: TelemetryUploader | None = None
        self.window_s, self.upload_interval_s = 60.0, 60.0
        self.last_served_at = 0.0
        self.last_upload_at = 0.0
        self.failures = 0
        self.failed_targets: dict[str, int] = {}
        self.booted_at = time.time()
        self.counters = DeviceCounters()

    # --- clock ----------------------------------------------------------------------------------------

    def now(self) -> float:
        """The device's wall clock (skewed when the scenario says so)."""
        return time.time() + self.faults.clock_skew_s

    def iso_now(self) -> str:
        return dt.datetime.fromtimestamp(self.now(), dt.timezone.utc).isoformat()

    # --- enrollment -------------------------------------------------------------------------------------

    def inventory(self) -> dict[str, Any]:
        installed = [] if self.running is None else [
            {"name": MODEL, "version": self.running, "variant": "onnx-fp32", "slot": "a", "state": "active",
             "runtime": "onnxruntime", "runtime_version": "1.20.1"}
        ]  # fmt: skip
        return {
            "hw_class": self.profile.hw_class,
            "agent_version": "0.1.0",
            "capabilities": {"arch": self.profile.arch, "os": "linux", "python": "3.11.2",
                             "runtimes": {"onnxruntime": "1.20.1"}, "accelerators": ["cpu"],
                             "memory_mb": self.profile.memory_mb, "disk_free_mb": 20000, "preferences": []},
            "installed": installed,
        }  # fmt: skip

    def enroll(self) -> None:
        """Enroll with a fresh Ed25519 key (the real agent's FleetClient); raises on failure."""
        self.dir.mkdir(parents=True, exist_ok=True)
        client = FleetClient(self.fleet.base_url, transport=self.link, timeout_s=30.0)
        enrollment, root = client.enroll(self.fleet.token, Ed25519PrivateKey.generate(), self.inventory())
        client.access_token = enrollment.access_token
        self.client, self.device_id = client, enrollment.device_id
        self.trusted_root = json.dumps(root).encode("utf-8")
        self.metadata_url, self.targets_url = enrollment.metadata_url, enrollment.targets_url
        self.state = "idle"

    # --- one step ---------------------------------------------------------------------------------------

    def step(self) -> float:
        """Poll, install if directed, serve, upload; returns how long to wait before the next step (s)."""
        t = time.time()
        if t < self.power_off_until:
            return self.power_off_until - t
        offline = self._offline(t)
        self.link.online = not offline
        if offline:
            self.state = "offline"
        elif self.state in ("offline", "power_off"):
            self.state = "idle"
        if self.client is None:
            if offline:
                return 5.0
            self.enroll()
        buffer = TelemetryBuffer(self.dir / "telemetry.db", BUFFER_CAP_BYTES)
        try:
            self._attach(buffer)
            if offline:  # the app is still served and its telemetry buffered; uploads fail and back off
                self._serve(t)
                self._maybe_upload(t)
                return 5.0
            return self._step_online(t)
        finally:
            buffer.close()

    def _offline(self, t: float) -> bool:
        start = self.faults.offline_from_s
        if start is None:
            return False
        elapsed = t - self.fleet.started_at
        return start <= elapsed < start + self.faults.offline_s

    def _step_online(self, t: float) -> float:
        try:
            self._poll()
            self._maybe_install()
        except PowerLoss:
            return self._power_off()
        except TransportError:
            self.counters.transport_errors += 1
            self.failures += 1
            self._serve(t)
            return self._backoff_s()
        self.failures = 0
        self._serve(t)
        self._maybe_upload(t, every_round=True)
        return self._poll_wait_s()

    def _backoff_s(self) -> float:
        ceiling = min(60.0, 2.0 * 2.0 ** min(self.failures, 6))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def _poll_wait_s(self) -> float:
        if self.staged is not None:
            return max(0.05, self.staged[4] - time.time())
        poll = self.desired.poll_interval_s if self.desired and self.desired.poll_interval_s else 60.0
        jitter = self.desired.jitter_s if self.desired and self.desired.jitter_s else 0.0
        return float(poll) + self.rng.uniform(-float(jitter), float(jitter))

    def _poll(self) -> None:
        assert self.client is not None
        started = time.perf_counter()
        state, etag = self.client.desired_state(self.etag)
        self.counters.polls += 1
        self.counters.poll_latency_ms.append((time.perf_counter() - started) * 1000)
        if state is None:
            self.counters.not_modified += 1
            return
        self.desired, self.etag = state, etag
        if state.telemetry is not None:
            self.window_s = float(state.telemetry.window_s or self.window_s)
            self.upload_interval_s = float(state.telemetry.upload_interval_s or self.upload_interval_s)

    def _entry(self) -> DesiredModel | None:
        if self.desired is None:
            return None
        return next((m for m in self.desired.models if m.name == MODEL), None)

    def _due(self, entry: DesiredModel) -> bool:
        if entry.start_after is None:
            return True
        try:
            return dt.datetime.fromisoformat(entry.start_after).timestamp() <= self.now()
        except ValueError:
            return True

    # --- install ----------------------------------------------------------------------------------------

    def _maybe_install(self) -> None:
        entry = self._entry()
        if self.staged is not None:
            self._commit_when_transferred(entry)
            return
        if entry is None or entry.version == self.running or not self._due(entry):
            return
        if self.failed_targets.get(entry.manifest_target, 0) >= 5:
            return  # given up on this target (as the agent's failed-targets list does)
        self.state = "installing"
        previous = self.running
        crash_at = self._crash_point()
        received_before, requests_before = self.link.stats.bytes_down, self.link.stats.requests
        try:
            variant = self._download(entry, crash_at)
        except EdgeFleetError as e:
            self._install_failed(entry, e)
            return
        stats = self.link.stats
        transfer_s = self.profile.transfer_s(
            stats.bytes_down - received_before, stats.requests - requests_before, self.faults.slow_factor
        )
        self.staged = (entry, variant, previous, crash_at, time.time() + transfer_s)
        self._commit_when_transferred(entry)

    def _commit_when_transferred(self, entry: DesiredModel | None) -> None:
        """Commit the staged install once its bytes would have crossed this board's link (loopback is faster
        than any device's): the download's simulated duration is its bytes and round trips on the profile's link."""
        assert self.staged is not None
        staged, variant, previous, crash_at, ready_at = self.staged
        if entry is None or entry.manifest_target != staged.manifest_target:
            self.staged, self.state = None, "idle"  # directed elsewhere meanwhile: the staged bundle is dropped
            return
        if time.time() < ready_at:
            self.state = "downloading"
            return
        self.staged = None
        self._commit(entry, variant, previous, crash_at)

    def _commit(self, entry: DesiredModel, variant: str, previous: int | None, crash_at: str | None) -> None:
        self.versions_run.add(entry.version)
        if crash_at == "commit":
            self.running = entry.version
            self.pending_events.append(self._install_event(entry, previous, variant))
            raise PowerLoss("after commit")
        self.running = entry.version
        self.state = "idle"
        self.counters.installs += 1
        self.pending_events.append(self._install_event(entry, previous, variant))
        assert self.client is not None
        self.client.put_inventory(self.inventory())

    def _crash_point(self) -> str | None:
        if self.faults.power_loss and self.rng.random() < self.faults.power_loss:
            return self.rng.choice(INSTALL_STEPS)
        return None

    def _download(self, entry: DesiredModel, crash_at: str | None) -> str:
        """Refresh TUF metadata, fetch the manifest and the variant through TUF (verified); the variant id."""
        tuf = self._tuf()
        if crash_at == "refresh":
            raise PowerLoss("during the metadata refresh")
        tuf.refresh()
        manifest_path = tuf.download(entry.manifest_target)
        manifest = Manifest.from_bytes(Path(manifest_path).read_bytes())
        self.manifests[manifest.version] = manifest
        if crash_at == "manifest":
            raise PowerLoss("after the manifest")
        variant = entry.variant or manifest.variants[0].id
        if crash_at == "download":
            raise PowerLoss("during the variant download")
        tuf.download(variant_target(entry.manifest_target, variant))
        return variant

    def _tuf(self) -> TufClient:
        assert self.client is not None and self.client.access_token is not None
        return TufClient(self.dir / "metadata", self.dir / "targets", self.metadata_url, self.targets_url,
                         trusted_root=self.trusted_root, http=self.client.http,
                         bearer_token=self.client.access_token, stall_window_s=30.0)  # fmt: skip

    def _install_failed(self, entry: DesiredModel, error: EdgeFleetError) -> None:
        self.state = "idle"
        if isinstance(error, TransportError):
            raise error
        self.counters.install_failures += 1
        self.counters.trust_errors += "Mismatch" in type(error).__name__ or "Trust" in type(error).__name__
        self.failed_targets[entry.manifest_target] = self.failed_targets.get(entry.manifest_target, 0) + 1
        shutil.rmtree(self.dir / "targets" / ".partial", ignore_errors=True)

    def _install_event(self, entry: DesiredModel, previous: int | None, variant: str) -> dict[str, Any]:
        event = install_event(
            MODEL, entry.version, "installed", previous, entry.rollout_id, None,
            ["downloading", "verifying", "staged", "self_test", "committed"], status="installed", variant=variant,
            runtime="onnxruntime", runtime_version="1.20.1",
            downgrade=previous is not None and entry.version < previous,
        )  # fmt: skip
        event["at"] = self.iso_now()
        return event

    def _power_off(self) -> float:
        """The power went: in-memory state is lost; back after a short reboot."""
        self.counters.power_losses += 1
        self.state = "power_off"
        self.recorder, self.uploader, self.etag, self.desired, self.staged = None, None, None, None, None
        off_s = self.rng.uniform(2.0, 8.0)
        self.power_off_until = time.time() + off_s
        return off_s

    # --- telemetry --------------------------------------------------------------------------------------

    def _attach(self, buffer: TelemetryBuffer) -> None:
        """Point the recorder and uploader at this step's buffer (opened per step: 10,000 devices' SQLite
        files cannot all stay open in one process)."""
        if self.recorder is None:
            settings = TelemetrySettings(window_s=self.window_s, upload_interval_s=self.upload_interval_s,
                                         buffer_cap_bytes=BUFFER_CAP_BYTES, sample_rate=0.02)  # fmt: skip
            self.recorder = TelemetryRecorder(buffer, settings, clock=self.now, rng=self.rng)
        assert self.client is not None
        if self.uploader is None:
            self.uploader = TelemetryUploader(buffer, self.client.http, self.client.headers, backoff_initial_s=2.0,
                                              backoff_max_s=30.0)  # fmt: skip
        self.recorder.buffer = buffer
        self.uploader.buffer = buffer
        if self.recorder.settings.window_s != self.window_s:
            self.recorder.settings = TelemetrySettings(window_s=self.window_s, upload_interval_s=self.upload_interval_s,
                                                       buffer_cap_bytes=BUFFER_CAP_BYTES, sample_rate=0.02)  # fmt: skip
        for event in self.pending_events:
            self.recorder.event(event)
        self.pending_events = []

    def _serve(self, t: float) -> None:
        """The app's requests since the last step, answered by the behaviour model and recorded."""
        if self.running is None or self.recorder is None or self.running not in self.manifests:
            self.last_served_at = t
            return
        elapsed = t - (self.last_served_at or t)
        self.last_served_at = t
        count = min(MAX_REQUESTS_PER_STEP, _poisson(self.rng, elapsed * self.rate))
        manifest = self.manifests[self.running]
        model = self.fleet.model(manifest)
        base = self.profile.base_latency_ms
        deadline_ms = manifest.runtime_config.deadline_ms
        for _ in range(count):
            answer = model.answer(self.rng, base)
            self.counters.requests += 1
            late = deadline_ms is not None and answer.latency_ms > deadline_ms
            if (answer.error is not None or late) and self._cloud():
                self._answer_from_cloud(manifest, model, answer, "local_error" if answer.error else "deadline")
            elif answer.error is not None:
                self.counters.errors += 1
                self.recorder.record(MODEL, manifest, answer.inputs, None, None, answer.latency_ms, error=answer.error)
            else:
                self.recorder.record_local(MODEL, manifest, answer.inputs, answer.outputs or {}, answer.latency_ms)

    def _cloud(self) -> bool:
        """Is there a cloud to fall back to? As the agent: the endpoint the desired state names (the server
        always names the fleet's), unless the scenario says that endpoint is down (``cloud_fallback = false``)."""
        fallback = self.desired.fallback if self.desired is not None else None
        return self.fleet.cloud_fallback and fallback is not None and bool(fallback.url)

    def _answer_from_cloud(self, manifest: Manifest, model: ModelBehaviour, answer: Answer, reason: str) -> None:
        """The serving pipeline's fallback, shortcut: the cloud answers with the golden outputs after the
        local attempt (cut at the deadline) and a round trip (docs/simulator.md)."""
        assert self.recorder is not None
        self.counters.fallbacks += 1
        deadline_ms = manifest.runtime_config.deadline_ms or answer.latency_ms
        latency_ms = min(answer.latency_ms, deadline_ms) + self.profile.rtt_ms + 5.0
        good = model.cases[self.rng.randrange(len(model.cases))]
        self.recorder.record(MODEL, manifest, answer.inputs, dict(good.outputs or {}), "cloud", latency_ms,
                             fallback_reason=reason)  # fmt: skip

    rate = 1.0

    def _maybe_upload(self, t: float, every_round: bool = False) -> None:
        """Heartbeat, close due windows, upload. Online, every step does it, as the agent's daemon reports at the end
        of every poll round (so an install is reported in the round that made it); offline, every upload interval."""
        due = every_round or t - self.last_upload_at >= self.upload_interval_s
        if not due or self.recorder is None or self.uploader is None:
            return
        self.recorder.tick()
        if self.running is not None:
            models = [{"name": MODEL, "version": self.running, "state": "active"}]
            beat = heartbeat_event(t - self.booted_at, models, buffer=self.recorder.buffer.stats())
            beat["at"] = self.iso_now()  # the device's own (possibly skewed) clock, as the agent's
            self.recorder.event(beat)
        if self.uploader.maybe_drain() is not None:
            self.counters.uploads += 1
            self.last_upload_at = t

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    threshold, k, p = math.exp(-mean), 0, rng.random()
    while p > threshold:
        k += 1
        p *= rng.random()
    return k
