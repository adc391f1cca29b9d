"""One simulator worker process: its shard of the fleet on its own event loop.

Why processes: a virtual device's step is Python (the agent's clients, TUF, the telemetry recorder),
so one process is bound by its GIL. The runner (:mod:`.runner`) therefore shards the fleet over
``[simulator] workers`` processes; each runs :func:`worker_main` on its devices and talks to the runner
over one pipe:

* runner -> worker: ``("start", wall_time)`` once every worker has made its devices (device ``i``
  enrolls at ``wall_time + i / enroll_per_s``), ``("faults_from", wall_time)`` (the scenario's rollouts
  started: device faults are scheduled from then on) and ``("stop", None)``;
* worker -> runner: ``("snapshot", Snapshot)`` twice a second (what the progress display, the timeline
  and the convergence checks are made of), ``("note", text)`` (a device that failed), ``("final",
  Totals)`` after a stop, and ``("error", text)`` if the worker could not run.

Sharding is deterministic: device ``i`` (its profile, faults, seed, directory and enrollment time) is the
same whatever the number of workers, and goes to worker ``i % workers`` (interleaved, so each worker
gets the same mix of boards and the same enrollment pace).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from bundles.errors import EdgeFleetError
from simulators.fleet.device import DeviceFaults, Fleet, VirtualDevice
from simulators.fleet.net import Balancer
from simulators.fleet.profiles import assign_profiles
from simulators.fleet.scenario import Scenario

SNAPSHOT_EVERY_S = 0.5
DEVICES_PER_WORKER = 2500  # the automatic worker count: one per this many devices, at most one per core


def auto_workers(devices: int, cores: int | None = None) -> int:
    """``[simulator] workers = 0``: one process per 2,500 devices, at most one per core (at least one)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, math.ceil(devices / DEVICES_PER_WORKER)))


@dataclass(frozen=True)
class ShardPlan:
    """What a worker needs to run its shard (picklable: it crosses the process boundary)."""

    scenario: Scenario
    shard: int
    shards: int
    url: str
    ports: tuple[int, ...]
    token: str
    work_dir: Path


@dataclass
class Snapshot:
    """One worker's fleet at a moment (counts over its devices)."""

    devices: int = 0
    enrolled: int = 0
    versions: dict[str, int] = field(default_factory=dict)  # "v2" or "none" -> devices running it
    states: dict[str, int] = field(default_factory=dict)
    exposed: dict[int, int] = field(default_factory=dict)  # version -> devices that ever ran it
    polls: int = 0
    bytes_down: int = 0


@dataclass
class Totals:
    """One worker's counters at the end of the run (summed over workers by the runner)."""

    counts: dict[str, int] = field(default_factory=dict)
    poll_latency_ms: list[float] = field(default_factory=list)


COUNTERS = ("polls", "not_modified", "requests", "errors", "fallbacks", "installs", "install_failures",
            "power_losses", "transport_errors", "trust_errors", "uploads")  # fmt: skip


def make_devices(plan: ShardPlan, fleet: Fleet) -> list[VirtualDevice]:
    """This shard's devices. The draws run over the whole fleet so device ``i`` is the same in every sharding."""
    spec, faults = plan.scenario.fleet, plan.scenario.faults
    rng = random.Random(spec.seed)  # noqa: S311 - simulation
    devices = []
    for index, profile in enumerate(assign_profiles(spec.devices, spec.profiles)):
        drawn = DeviceFaults(
            packet_loss=faults.packet_loss, cut=faults.cut_download, corrupt=faults.corrupt_download,
            power_loss=faults.power_loss,
            slow_factor=20.0 if rng.random() < faults.slow_link_share else 1.0,
            clock_skew_s=faults.clock_skew_s if rng.random() < faults.clock_skew_share else 0.0,
            offline_from_s=faults.offline_at_s if rng.random() < faults.offline_share else None,
            offline_s=faults.offline_s,
        )  # fmt: skip
        if index % plan.shards != plan.shard:
            continue
        device = VirtualDevice(index, profile, fleet, drawn, seed=spec.seed * 1_000_003 + index)
        device.rate = spec.requests_per_s
        devices.append(device)
    return devices


def snapshot(devices: list[VirtualDevice]) -> Snapshot:
    snap = Snapshot(devices=len(devices))
    for d in devices:
        key = "none" if d.running is None else f"v{d.running}"
        snap.versions[key] = snap.versions.get(key, 0) + 1
        snap.states[d.state] = snap.states.get(d.state, 0) + 1
        for version in d.versions_run:
            snap.exposed[version] = snap.exposed.get(version, 0) + 1
        snap.enrolled += d.device_id is not None
        snap.polls += d.counters.polls
        snap.bytes_down += d.link.stats.bytes_down
    return snap


def totals(devices: list[VirtualDevice]) -> Totals:
    out = Totals({name: sum(getattr(d.counters, name) for d in devices) for name in COUNTERS})
    out.counts["bytes_down"] = sum(d.link.stats.bytes_down for d in devices)
    out.counts["bytes_up"] = sum(d.link.stats.bytes_up for d in devices)
    out.counts["injected_faults"] = sum(d.link.stats.faults for d in devices)
    out.poll_latency_ms = [x for d in devices for x in d.counters.poll_latency_ms]
    return out


class Shard:
    """The worker's side: devices as tasks on this process's event loop, steps in a thread pool."""

    def __init__(self, plan: ShardPlan, conn: Connection) -> None:
        self.plan, self.conn = plan, conn
        spec = plan.scenario.fleet
        self.balancer = Balancer(plan.ports, pool_size=spec.concurrency * 2)
        behaviours = {b.version: (b.behaviour, b.rate) for b in plan.scenario.bundles}
        self.fleet = Fleet(plan.url, plan.token, self.balancer, plan.work_dir, behaviours, started_at=float("inf"))
        self.fleet.cloud_fallback = spec.cloud_fallback
        self.devices = make_devices(plan, self.fleet)
        self.stopping = False

    async def run(self) -> None:
        spec = self.plan.scenario.fleet
        self.executor = ThreadPoolExecutor(spec.concurrency, thread_name_prefix=f"device-{self.plan.shard}")
        self.tasks: list[asyncio.Task[None]] = []
        try:
            await self._serve_runner()
        finally:
            self.stopping = True
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.balancer.close()
        self.conn.send(("final", totals(self.devices)))

    async def _serve_runner(self) -> None:
        """Send snapshots, obey commands, until told to stop (or the runner is gone)."""
        while True:
            self.conn.send(("snapshot", snapshot(self.devices)))
            while self.conn.poll():
                command, value = self.conn.recv()
                if command == "stop":
                    return
                if command == "start":
                    self._start(float(value))
                if command == "faults_from":
                    self.fleet.started_at = float(value)
            await asyncio.sleep(SNAPSHOT_EVERY_S)

    def _start(self, enroll_from: float) -> None:
        per_s = self.plan.scenario.fleet.enroll_per_s
        self.tasks = [asyncio.create_task(self._drive(d, enroll_from + d.index / per_s)) for d in self.devices]

    async def _drive(self, device: VirtualDevice, start_at: float) -> None:
        """One device's life: step in a worker thread, sleep on the loop, again."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while not self.stopping:
            try:
                delay = await loop.run_in_executor(self.executor, device.step)
            except EdgeFleetError:
                delay = 5.0 + device.rng.uniform(0, 5)  # enrollment refused or the server unreachable: try again
            except Exception as e:  # noqa: BLE001 - a device's bug must not stop the fleet; it is counted
                device.state = "failed"
                self.conn.send(("note", f"device {device.index} failed: {type(e).__name__}: {e}"))
                return
            await asyncio.sleep(max(0.05, delay))


def worker_main(plan: ShardPlan, conn: Connection) -> None:
    """The worker process's entry point (``multiprocessing``, spawn)."""
    try:
        asyncio.run(Shard(plan, conn).run())
    except (EOFError, BrokenPipeError):
        pass  # the runner is gone: nothing to report to
    except BaseException:  # noqa: BLE001 - whatever stopped the worker goes to the runner, as text
        try:
            conn.send(("error", f"simulator worker {plan.shard}: {traceback.format_exc(limit=8)}"))
        except (OSError, EOFError):
            pass
        raise SystemExit(1) from None
    finally:
        conn.close()


def merge_snapshots(snaps: list[Snapshot]) -> Snapshot:
    out = Snapshot()
    for s in snaps:
        out.devices += s.devices
        out.enrolled += s.enrolled
        out.polls += s.polls
        out.bytes_down += s.bytes_down
        for target, source in ((out.versions, s.versions), (out.states, s.states)):
            for key, n in source.items():
                target[key] = target.get(key, 0) + n
        for version, n in s.exposed.items():
            out.exposed[version] = out.exposed.get(version, 0) + n
    return out


def merge_totals(parts: list[Totals]) -> Totals:
    out = Totals()
    for part in parts:
        for key, n in part.counts.items():
            out.counts[key] = out.counts.get(key, 0) + n
        out.poll_latency_ms += part.poll_latency_ms
    return out
